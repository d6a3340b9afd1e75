"""An application whose import raises (a runner booting it exits with APP_FAILED)."""

import sys

print("lifecycle_bad_app: configuring the database", file=sys.stderr)
raise RuntimeError("lifecycle_bad_app_marker: cannot reach the database")
