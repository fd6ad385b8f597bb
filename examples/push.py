"""Publish a trained out_dir (or a prepared data_dir) on the Hugging Face Hub.

    hf auth login                        # once (or: export HF_TOKEN=hf_...)
    python examples/push.py out/shakespeare-char you/nanogpt-shakespeare-char
    python examples/push.py out/shakespeare-char you/nanogpt-shakespeare-char --private --revision step-5000
    python examples/push.py out/shakespeare-char you/nanogpt-shakespeare-char --export_gpt2  # + you/..-gpt2
    python examples/push.py data/shakespeare_char you/shakespeare-char-tokens --dataset
    python examples/push.py out/shakespeare-char you/nanogpt-shakespeare-char --space you/shakespeare-demo
                                                   # + a Gradio Space running examples/demo.py on the model

Then, anywhere, with only transformers installed:
    AutoModelForCausalLM.from_pretrained("you/nanogpt-shakespeare-char", trust_remote_code=True)
The out_dir is only read: the model card is rendered on the fly and nothing is written there.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo.py beside this file writes the Space's app.py

from demo import space_files  # noqa: E402  (imports neither gradio nor torch)

from nanogpt_hf.cli import error_boundary  # noqa: E402
from nanogpt_hf.hub import push_data_dir, push_dir, push_gpt2, push_space  # noqa: E402


@error_boundary  # what escapes: bad input -> one `error:` line (--debug: traceback), a bug -> traceback
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="a trained out_dir (or, with --dataset, a prepared data_dir)")
    parser.add_argument("repo_id", help="namespace/name on the Hub, e.g. you/nanogpt-shakespeare-char")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if new)")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--export_gpt2", action="store_true",
                        help="also push a vanilla GPT2LMHeadModel copy that needs no remote code")
    parser.add_argument("--gpt2_repo_id", default=None, help="repo for --export_gpt2 (default: <repo_id>-gpt2)")
    parser.add_argument("--dataset", action="store_true", help="push a prepared data_dir to a dataset repo")
    parser.add_argument("--space", default=None, metavar="SPACE_ID",
                        help="also push a Gradio Space (examples/demo.py as app.py) that demos repo_id")
    args = parser.parse_args(argv)

    kwargs = dict(private=args.private, revision=args.revision, commit_message=args.commit_message, token=args.token)
    if args.dataset:
        sha = push_data_dir(args.out_dir, args.repo_id, **kwargs)
        print(f"pushed {args.out_dir} to dataset {args.repo_id} (commit {sha}); "
              f"train on it with data_dir=hf://datasets/{args.repo_id}")
        return
    sha = push_dir(args.out_dir, args.repo_id, **kwargs)
    print(f"pushed {args.out_dir} to {args.repo_id} (commit {sha})")
    if args.export_gpt2:
        gpt2_id = args.gpt2_repo_id or f"{args.repo_id}-gpt2"
        sha = push_gpt2(args.out_dir, gpt2_id, **kwargs)
        print(f"pushed the GPT2LMHeadModel export to {gpt2_id} (commit {sha})")
    if args.space:
        sha = push_space(space_files(args.repo_id), args.space, private=args.private, token=args.token)
        print(f"pushed the demo Space to {args.space} (commit {sha}): https://huggingface.co/spaces/{args.space}")


if __name__ == "__main__":
    main()
