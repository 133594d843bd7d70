"""make config PHASE=<p> ARGS='k=v ...': the phase's config as the run would resolve it, checked, in a fraction of a
second (no torch import): what `config.resolved.yaml` will record, and every refusal the load would give (exit 2).
"""

from __future__ import annotations

import argparse

from cogumi.core.config import load_config, phase_config_path, resolved_yaml
from cogumi.core.errors import EXIT_OK, run_main
from cogumi.evaluate.pairing import check_gates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", default="1a", help="1a, 1b, demo, or a path to a YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=50")
    args = parser.parse_intermixed_args(argv)
    path = phase_config_path(args.phase)
    config = load_config(path, args.overrides)
    check_gates(config.validate.gates, list(config.validate.tasks), source=f"{args.phase}: validate.gates")
    print(f"# {path} with {' '.join(args.overrides) or 'no overrides'}: checked; outputs in {config.run_dir}")
    print(resolved_yaml(config))
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
