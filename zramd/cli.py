"""Placeholder; replaced by the click CLI."""


def main() -> None:
    raise SystemExit("not yet")
