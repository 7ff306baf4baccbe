import sys

try:
    from .cli import main
except KeyboardInterrupt:  # a Ctrl-C while Python was still importing streamtag: a stop, not a traceback
    print("streamtag: interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
