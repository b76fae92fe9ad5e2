"""Parses an OpenMetrics scrape on stdin with the Prometheus project's own parser
(prometheus_client.openmetrics.parser, which rejects a repeated family, metadata after
samples, a missing "# EOF", a histogram without its +Inf bucket, ...).

Prints {"families": {name: {"type": ..., "samples": [[sample, labels, value], ...]}}}
as JSON; on a parse error prints the reason to stderr and exits 1.
"""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main() -> int:
    text = sys.stdin.read()
    try:
        families = {
            f.name: {
                "type": f.type,
                "samples": [[s.name, s.labels, s.value] for s in f.samples],
            }
            for f in text_string_to_metric_families(text)
        }
    except Exception as e:  # the parser raises ValueError and others
        print(f"not valid OpenMetrics: {e}", file=sys.stderr)
        return 1
    json.dump({"families": families}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
