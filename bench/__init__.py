"""Side-by-side benchmarks of bunmyaku against ``transformers`` on the same machine, in the same run."""


def at_least(low: float, kind: type = int):
    """An argparse ``type`` that refuses a number below ``low`` with one line (argparse exits 2, no traceback)."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not value >= low:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        return value

    return parse
