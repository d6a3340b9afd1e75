"""An application whose import never finishes (a runner booting it misses boot_timeout)."""

import sys
import time

print("lifecycle_hang_app: waiting for a lock that never comes", file=sys.stderr, flush=True)
while True:
    time.sleep(0.05)
