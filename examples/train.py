"""
Train a nanoGPT model: a YAML config (optional) plus --key value overrides (defaults < YAML < command line).

    python examples/train.py examples/configs/shakespeare_char_cpu.yaml
    python examples/train.py examples/configs/shakespeare_char_cpu.yaml --max_iters=500 --out_dir out-test
    accelerate launch examples/train.py examples/configs/shakespeare_char.yaml
    torchrun --nproc_per_node 2 examples/train.py examples/configs/python_char_cpu.yaml
    python examples/train.py --help        # every key, its default and what it does

Exit codes: 0 done; 1 an error (one line); 130 / 143 / 138 stopped by SIGINT (Ctrl-C) / SIGTERM / SIGUSR1 after
writing a checkpoint (continue with --init_from resume).
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanogpt_hf.train_config import config_help, parse_config


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\n" + config_help())
        return
    try:
        cfg = parse_config(argv)
        from nanogpt_hf.trainer import train  # after parsing: a typo fails fast, without importing torch

        train(cfg)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except Exception as e:  # a stop signal (SIGINT, SIGTERM, SIGUSR1) after its checkpoint: exit 128 + signal
        from nanogpt_hf.guards import Interrupted

        if not isinstance(e, Interrupted):
            raise
        if os.environ.get("RANK", "0") == "0":  # every rank stops; one line is enough
            print(e, file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
