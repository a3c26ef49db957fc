"""Wall-clock timing shared by the bench scripts."""
import time


def best_ms(fn, repeats: int) -> float:
    """Milliseconds per call of ``fn``: one warm-up call, then the best of 3 rounds of ``repeats``."""
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 1e3 * best
