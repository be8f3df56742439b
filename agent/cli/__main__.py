"""python -m agent.cli"""

from . import main

main()
