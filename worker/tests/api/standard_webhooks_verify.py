"""Verifies notifications with the Standard Webhooks reference library for Python (PyPI's
`standardwebhooks`), not with monohook's code. Reads {"secret": ..., "messages": [{"body_b64": ...,
"headers": {...}}]} on stdin; prints one line per message: "ok <parsed type>" or "refused <why>"."""

import base64
import json
import sys

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

request = json.load(sys.stdin)
verifier = Webhook(request["secret"])
for message in request["messages"]:
    body = base64.b64decode(message["body_b64"])
    try:
        parsed = verifier.verify(body, message["headers"])
        print("ok", parsed["type"])
    except WebhookVerificationError as error:
        print("refused", error)
