"""The heavy work, in a module of its own so that ``load.py``'s control processes can run it
without importing the web app."""


def crunch(n: int) -> int:
    """CPU-bound pure Python: holds the GIL from start to end."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total
