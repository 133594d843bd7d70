"""The small library shared by the entry scripts in scripts/ (imported as `cogumi`)."""
