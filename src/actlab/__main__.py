"""``python -m actlab ...``: the CLI, so that ``torchrun --nproc-per-node N -m actlab record ...`` starts it on
every rank (``actlab record`` joins the group torchrun describes and records its share of the shards)."""

from actlab.cli import app

if __name__ == "__main__":
    app(prog_name="actlab")
