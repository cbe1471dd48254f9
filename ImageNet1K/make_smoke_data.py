"""Write a small generated ImageNet in the real ImageFolder layout (<root>/imagenet/{train,val}/<wnid>/*.JPEG).

Usage: python ImageNet1K/make_smoke_data.py --root DIR [--classes 4] [--train 12] [--val 4] [--size 40] [--seed 0]
Existing data is left alone.
"""
import argparse
import sys
from pathlib import Path

from imagenet import write_imagefolder

from common.errors import cli_main


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="data root; images go to ROOT/imagenet/{train,val}")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--train", type=int, default=12, help="training images per class")
    parser.add_argument("--val", type=int, default=4, help="official-validation (our test) images per class")
    parser.add_argument("--size", type=int, default=40, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = Path(args.root) / "imagenet"
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        print(f"{folder} already exists; left as it is")
        return
    write_imagefolder(folder, args.classes, args.train, args.val, args.size, args.seed)
    print(f"wrote a generated ImageNet ({args.classes} classes, {args.train} train / {args.val} val images each) "
          f"to {folder}")


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
