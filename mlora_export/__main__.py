"""``python -m mlora_export`` runs the CLI (useful under ``torchrun`` / ``accelerate launch``)."""

from .cli import main

if __name__ == "__main__":
    main()
