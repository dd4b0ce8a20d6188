"""A tiny app loop around the device runtime: enroll classes from a folder, then classify a stream.

    python examples/embed_in_app.py --enroll shots/ --classify incoming/
    python examples/embed_in_app.py --enroll shots/ --classify incoming/ --watch   # new files too

``shots/`` holds a subfolder of a few images per class (its name is the label); ``incoming/`` the
images to classify. Only numpy, onnxruntime and Pillow run underneath: no torch.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

from fewshot_edge.imagefiles import class_folders, image_files
from fewshot_edge.runtime import FewShotInputError, FewShotModel
from fewshot_edge.runtime.pretrained import default_bundle


def stream(folder: Path, watch: bool, poll_s: float = 0.5) -> Iterator[Path]:
    """The images in ``folder``; with ``watch``, then every new one as it appears, until Ctrl-C."""
    seen: set[Path] = set()
    while True:
        for path in image_files(folder):
            if path not in seen:
                seen.add(path)
                yield path
        if not watch:
            return
        time.sleep(poll_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--enroll", type=Path, required=True, help="folder with a subfolder of images per class")
    parser.add_argument("--classify", type=Path, required=True, help="folder of images to classify")
    parser.add_argument("--watch", action="store_true", help="keep classifying new files as they arrive")
    parser.add_argument("--bundle", type=Path, help="bundle folder (default: the pretrained Omniglot model)")
    parser.add_argument("--store", type=Path, help="SQLite enrollment store to keep (default: in memory)")
    args = parser.parse_args()

    with FewShotModel.open(args.bundle or default_bundle(), store=args.store) as model:
        enrolled = dict(model.classes())
        for label, files in class_folders(args.enroll).items():
            if label not in enrolled:
                model.enroll(label, files)
                print(f"enrolled {label} from {len(files)} images")
        try:
            for path in stream(args.classify, args.watch):
                try:
                    p = model.predict(path)[0]
                except FewShotInputError as exc:  # e.g. a file still being written: report and go on
                    print(f"{path.name}: skipped ({exc})")
                    continue
                print(f"{path.name}: {p.label} (p={p.probability:.2f}, distance {p.distance:.3g})")
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
