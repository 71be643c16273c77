"""Open the vlm-chat web UI: ``python app.py [--model DIR] [--host 127.0.0.1] [--port 7860] [--share]``.

The same as ``vlm-chat serve``; ``python app.py --help`` lists every option.
"""

import sys

from vlm_chat.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
