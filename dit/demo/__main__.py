"""python -m dit.demo key=value ...: the page (python -m dit.demo --help lists the keys' uses)."""

from dit.demo import main

if __name__ == "__main__":
    main()
