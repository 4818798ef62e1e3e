"""Verifies notifications with the Standard Webhooks reference library for Python (PyPI's
`standardwebhooks`), not with monohook's code, and checks each verified body against the
`Notification` schema of api/openapi.json with PyPI's `jsonschema`. Reads {"secret": ..., "openapi":
<path>, "messages": [{"body_b64": ..., "headers": {...}}]} on stdin; prints one line per message:
"ok <type>", "refused <why>" (signature) or "invalid <why>" (schema)."""

import base64
import json
import sys

from jsonschema import Draft202012Validator
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

request = json.load(sys.stdin)
verifier = Webhook(request["secret"])
with open(request["openapi"]) as document:
    components = json.load(document)["components"]
schema = {"$ref": "#/components/schemas/Notification", "components": components}
validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
for message in request["messages"]:
    body = base64.b64decode(message["body_b64"])
    try:
        parsed = verifier.verify(body, message["headers"])
    except WebhookVerificationError as error:
        print("refused", error)
        continue
    problems = [error.message for error in validator.iter_errors(parsed)]
    print("invalid " + "; ".join(problems) if problems else "ok " + parsed["type"])
