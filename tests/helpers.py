"""Small helpers the test modules share."""

import time


def wait_for(predicate, timeout=10.0):
    """Poll `predicate` until it is true or `timeout` seconds pass; return whether it came true."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False
