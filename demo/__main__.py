import signal
import sys

from .main import main

signal.signal(signal.SIGTERM, signal.default_int_handler)  # a terminated demo stops like Ctrl-C: work kept
sys.exit(main())
