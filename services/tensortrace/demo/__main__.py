import sys

from tensortrace.demo.run import main

sys.exit(main())
