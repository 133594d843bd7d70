"""The judges: is a model's answer right? Math (answer extraction, normalization, symbolic equality in a worker
process) and code (the candidate program run in a contained sandbox). Generation and reporting live in evaluate/."""
