"""Write a small generated CIFAR-10 in the real torchvision format (cifar-10-batches-py pickles).

Usage: python CIFAR-10/make_smoke_data.py --root DIR [--train 300] [--test 100] [--seed 0]
Existing files are left alone. Read it with --data.verify_md5 false (it cannot match the official md5s).
"""
import argparse
import sys

from cifar import CIFAR_FILES, write_cifar10_archive

from common.errors import cli_main


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="data root; files go to ROOT/cifar-10-batches-py")
    parser.add_argument("--train", type=int, default=300, help="training images (over the 5 batches)")
    parser.add_argument("--test", type=int, default=100, help="test images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from pathlib import Path

    folder = Path(args.root) / "cifar-10-batches-py"
    if all((folder / name).is_file() for name in CIFAR_FILES):
        print(f"{folder} already exists; left as it is")
        return
    write_cifar10_archive(args.root, args.train, args.test, args.seed)
    print(f"wrote a generated CIFAR-10 ({args.train} train / {args.test} test images) to {folder}")


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
