"""`python -m jackpot ...`: the same commands as the `jackpot` script (and what torchrun / accelerate launch run)."""

from jackpot.cli import run

if __name__ == "__main__":
    run()
