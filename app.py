"""`python app.py [options]`: the sdlora Gradio app, the same as `sdlora app` (see `sdlora app --help`)."""

import sys

from sdlora.cli import main

if __name__ == "__main__":
    sys.exit(main(["app", *sys.argv[1:]]))
