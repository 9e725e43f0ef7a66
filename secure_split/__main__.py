"""`python -m secure_split` is the `secure-split` command."""

from secure_split.cli.main import main

if __name__ == "__main__":
    main()
