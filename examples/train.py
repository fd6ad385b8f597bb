"""
Train a nanoGPT model: a YAML config (optional) plus --key value overrides (defaults < YAML < command line).

    python examples/train.py examples/configs/shakespeare_char_cpu.yaml
    python examples/train.py examples/configs/shakespeare_char_cpu.yaml --max_iters=500 --out_dir out-test
    accelerate launch examples/train.py examples/configs/shakespeare_char.yaml
    torchrun --nproc_per_node 2 examples/train.py examples/configs/python_char_cpu.yaml
    python examples/train.py --help        # every key, its default and what it does

Exit codes: 0 done; 1 an error (one line; --debug or NANOGPT_DEBUG=1: with its traceback); 130 / 143 / 138 / 129 /
140 stopped by SIGINT (Ctrl-C) / SIGTERM / SIGUSR1 / SIGHUP / SIGUSR2 after writing a checkpoint (continue with
--init_from resume).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from nanogpt_hf.cli import error_boundary
from nanogpt_hf.train_config import config_help, parse_config


@error_boundary  # bad input: one `error:` line (--debug: the traceback); a stop signal: exit 128 + signal
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\n" + config_help())
        return
    cfg = parse_config(argv)
    from nanogpt_hf.trainer import train  # after parsing: a typo fails fast, without importing torch

    train(cfg)


if __name__ == "__main__":
    main()
