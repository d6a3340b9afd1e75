"""What runs on runners in the tests: work they are called with (pickled by reference, so a
runner imports these modules through the parent's ``sys.path``, or the test image's
``PYTHONPATH``), and small applications they import (apps that fail, hang or lie about
their versions). Nothing here imports what a runner does not need."""
