"""An application that cannot start: importing it raises (used to test boot failures)."""

raise RuntimeError("this app cannot start: bad_app_marker")
