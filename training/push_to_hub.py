"""Push an existing training output directory to the Hugging Face Hub.

    python training/push_to_hub.py OUTPUT_DIR --hub_model_id user/repo [--hub_private_repo] [--hub_token T]

Uploads the pipeline (model_index.json, scheduler/, unet/ safetensors), the model card README.md and the
last sample grid; never checkpoints, optimizer state or logs. Exits 1 with a message on failure; the
output directory is never modified.
"""

import argparse
import sys

from ddpm_plus.hub import HubPushError, push_output_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", help="a training output directory (holds model_index.json)")
    parser.add_argument("--hub_model_id", required=True, help="the repo id, e.g. user/ddpm-digits")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repo as private")
    parser.add_argument("--hub_token", default=None, help="default: HF_TOKEN or the cached login")
    parser.add_argument("--commit_message", default="Upload ddpm_plus pipeline")
    args = parser.parse_args(argv)
    try:
        info = push_output_dir(args.output_dir, args.hub_model_id, private=args.hub_private_repo,
                               token=args.hub_token, commit_message=args.commit_message)
    except HubPushError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Pushed {args.output_dir} to {args.hub_model_id}: {info.commit_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
