"""``python -m fewshot_edge.cli``: the ``fewshot-edge`` command, e.g. for ``torchrun -m fewshot_edge.cli train``."""

from fewshot_edge.cli import main

if __name__ == "__main__":
    main(prog_name="fewshot-edge")
