"""
A local fake of exactly the PayPal REST endpoints the market uses, for
tests: no machine here reaches PayPal.  It listens on 127.0.0.1 only.

    POST /v1/oauth2/token                       client credentials -> a bearer token
    POST /v1/payments/payment                   create a payment (intent sale, payer paypal)
    POST /v1/payments/payment/{id}/execute      execute an approved payment
    POST /v1/payments/payouts[/]                create a payout batch (the SDK adds the slash)
    GET  /v1/payments/payouts/{batch}           a payout batch's status

It checks what PayPal checks: the client id and secret (HTTP basic) on the
token request, the bearer token on every other, and the request bodies;
it answers in PayPal's shapes, with PayPal's error names.  Its approval
page, GET /webscr?cmd=_express-checkout&token=EC-..., plays the buyer
approving at PayPal: it redirects the browser to the payment's return URL
with paymentId, token and PayerID (or to the cancel URL).

Knobs (L{DEFAULT_KNOBS}) make it refuse or misbehave the way PayPal can.

In a test process: C{fake = FakePayPal(reactor); port = fake.listen()}.
As a process (integration tests):

    python test/paypalfake.py --client-id ID --secret S --address-file F

writes {"port": N} to F once listening; then POST /_fake/knobs (JSON)
changes knobs and GET /_fake/state shows payments, payouts and requests.
"""

import argparse
import base64
import json
import os
import re
import secrets
import string
import sys
import time
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from twisted.internet import defer
from twisted.protocols.policies import WrappingFactory
from twisted.web import resource, server

DEFAULT_KNOBS = {
    # The approval page approves ("approve") or cancels ("cancel").
    "approval": "approve",
    # An error name execute is refused with (INSTRUMENT_DECLINED), or None.
    "refuse_execute": None,
    # A total execute reports instead of the payment's: a tampered amount.
    "execute_total": None,
    # The state of the sale execute reports: completed, or pending.
    "sale_state": "completed",
    # Seconds every API answer waits.
    "delay": 0.0,
    # An error name payout creation is refused with (INSUFFICIENT_FUNDS), or None.
    "payout_refuse": None,
    # An HTTP status payout creation answers with AFTER creating the batch
    # (500: PayPal took it but the answer was lost), or None.
    "payout_answer_status": None,
    # How a payout created now ends: SUCCESS, FAILED, RETURNED (its item) or DENIED (the batch).
    "payout_outcome": "SUCCESS",
    # Status requests answered PROCESSING before a payout's outcome shows.
    "payout_polls": 1,
}

TOTAL = re.compile(r"^\d{1,7}(\.\d{2})?$")
CURRENCY = re.compile(r"^[A-Z]{3}$")
EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@defer.inlineCallbacks
def closeAll(reactor, wrappingFactory, timeout=5.0):
    """Abort every connection of a WrappingFactory and wait until they are gone."""
    for protocol in list(wrappingFactory.protocols):
        protocol.transport.abortConnection()
    deadline = reactor.seconds() + timeout
    while wrappingFactory.protocols and reactor.seconds() < deadline:
        d = defer.Deferred()
        reactor.callLater(0.01, d.callback, None)
        yield d


def _id(prefix, n=24):
    alphabet = string.ascii_uppercase + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(n))


def _stamp():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class Answer(Exception):
    """An HTTP answer other than success, in PayPal's error shape."""

    def __init__(self, status, name, message, details=None, body=None):
        Exception.__init__(self, f"{status} {name}")
        self.status = status
        self.body = body if body is not None else {
            "name": name, "message": message, "details": details or [],
            "debug_id": secrets.token_hex(6),
            "information_link": f"https://developer.paypal.com/docs/api/#{name.lower()}",
        }


def _validation(field, issue):
    return Answer(400, "VALIDATION_ERROR", "Invalid request - see details",
                  [{"field": field, "issue": issue}])


class FakePayPal(resource.Resource):
    isLeaf = True

    def __init__(self, reactor, clientId="cpushare-test-client", secret="cpushare-test-secret"):
        resource.Resource.__init__(self)
        self.reactor = reactor
        self.clientId = clientId
        self.secret = secret
        self.knobs = dict(DEFAULT_KNOBS)
        self.tokens = set()
        self.payments = {}
        self.byToken = {}
        self.payouts = {}
        self.senderBatchIds = set()
        self.requests = []
        self.baseUrl = None

    def listen(self):
        """Listen on 127.0.0.1, an ephemeral port; returns the port."""
        site = server.Site(self)
        site.noisy = False
        self.connections = WrappingFactory(site)
        self.port = self.reactor.listenTCP(0, self.connections, interface="127.0.0.1")
        self.baseUrl = f"http://127.0.0.1:{self.port.getHost().port}"
        return self.port

    @defer.inlineCallbacks
    def stop(self):
        """Stop listening and close the connections still open; fires when they are closed."""
        yield self.port.stopListening()
        yield closeAll(self.reactor, self.connections)

    def count(self, method, suffix):
        """How many requests were METHOD PATH ending in C{suffix}."""
        return sum(1 for m, p in self.requests if m == method and p.endswith(suffix))

    # -- HTTP

    def render(self, request):
        method = request.method.decode()
        path = request.path.decode()
        self.requests.append((method, path))
        if path.startswith("/_fake/"):
            return self.control(request, method, path)
        if path == "/webscr":
            return self.approvalPage(request)
        delay = float(self.knobs["delay"] or 0)
        d = defer.Deferred()
        if delay:
            self.reactor.callLater(delay, d.callback, None)
        else:
            d.callback(None)
        d.addCallback(lambda _: self.api(request, method, path))
        d.addErrback(self.crashed, request)
        d.addCallback(lambda answer: self.respond(request, *answer))
        return server.NOT_DONE_YET

    def crashed(self, failure, request):
        failure.printTraceback(sys.stderr)
        return 500, {"name": "INTERNAL_SERVICE_ERROR", "message": "the fake crashed"}

    def respond(self, request, status, body):
        if request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"paypal-debug-id", secrets.token_hex(6).encode())
        request.write(json.dumps(body).encode())
        request.finish()

    def api(self, request, method, path):
        try:
            if path == "/v1/oauth2/token" and method == "POST":
                return 200, self.token(request)
            self.checkBearer(request)
            parts = path.rstrip("/").split("/")
            if path == "/v1/payments/payment" and method == "POST":
                return 201, self.createPayment(self.jsonBody(request))
            if (len(parts) == 6 and parts[:4] == ["", "v1", "payments", "payment"]
                    and parts[5] == "execute" and method == "POST"):
                return 200, self.execute(parts[4], self.jsonBody(request))
            if path.rstrip("/") == "/v1/payments/payouts" and method == "POST":
                return self.createPayout(self.jsonBody(request))
            if len(parts) == 5 and parts[:4] == ["", "v1", "payments", "payouts"] \
                    and method == "GET":
                return 200, self.payoutStatus(parts[4])
            raise Answer(404, "NOT_FOUND", f"no {method} {path} at this fake PayPal")
        except Answer as a:
            return a.status, a.body

    def token(self, request):
        auth = request.getHeader("authorization") or ""
        expected = base64.b64encode(f"{self.clientId}:{self.secret}".encode()).decode()
        if auth != f"Basic {expected}":
            raise Answer(401, "invalid_client", "Client Authentication failed", body={
                "error": "invalid_client", "error_description": "Client Authentication failed"})
        if not (request.getHeader("content-type") or "").startswith(
                "application/x-www-form-urlencoded"):
            raise Answer(415, "UNSUPPORTED_MEDIA_TYPE", "form encoding expected")
        form = parse_qs(request.content.read().decode())
        if form.get("grant_type") != ["client_credentials"]:
            raise Answer(400, "unsupported_grant_type", "Grant Type is NULL", body={
                "error": "unsupported_grant_type", "error_description": "Grant Type is NULL"})
        token = "A21AA" + secrets.token_urlsafe(32)
        self.tokens.add(token)
        return {"scope": "https://uri.paypal.com/services/payments/payment",
                "access_token": token, "token_type": "Bearer",
                "app_id": "APP-80W284485P519543T", "expires_in": 32400,
                "nonce": secrets.token_hex(8)}

    def checkBearer(self, request):
        auth = request.getHeader("authorization") or ""
        if not auth.startswith("Bearer ") or auth[len("Bearer "):] not in self.tokens:
            raise Answer(401, "invalid_token", "Token signature verification failed", body={
                "error": "invalid_token",
                "error_description": "Token signature verification failed"})

    def jsonBody(self, request):
        if not (request.getHeader("content-type") or "").startswith("application/json"):
            raise Answer(415, "UNSUPPORTED_MEDIA_TYPE", "JSON expected")
        try:
            body = json.loads(request.content.read() or b"null")
        except ValueError:
            raise Answer(400, "MALFORMED_REQUEST", "The request JSON is not well formed.")
        if not isinstance(body, dict):
            raise Answer(400, "MALFORMED_REQUEST", "The request JSON is not an object.")
        return body

    # -- payments

    def createPayment(self, body):
        if body.get("intent") != "sale":
            raise _validation("intent", "This fake takes intent sale")
        if (body.get("payer") or {}).get("payment_method") != "paypal":
            raise _validation("payer.payment_method", "Must be paypal")
        urls = body.get("redirect_urls") or {}
        for name in ("return_url", "cancel_url"):
            parts = urlsplit(urls.get(name) or "")
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise _validation(f"redirect_urls.{name}", "Required field missing or not a URL")
        transactions = body.get("transactions")
        if not isinstance(transactions, list) or len(transactions) != 1:
            raise _validation("transactions", "Exactly one transaction, in this fake")
        amount = transactions[0].get("amount") or {}
        total, currency = str(amount.get("total") or ""), str(amount.get("currency") or "")
        if not TOTAL.match(total) or int(total.replace(".", "")) == 0:
            raise _validation("transactions[0].amount.total",
                              "Currency amount must be non-negative number, may optionally "
                              "contain exactly 2 decimal places separated by '.'")
        if not CURRENCY.match(currency):
            raise _validation("transactions[0].amount.currency", "Currency code is invalid")
        if len(transactions[0].get("description") or "") > 127:
            raise _validation("transactions[0].description", "Length exceeds 127")
        paymentId = _id("PAY-")
        token = _id("EC-", 17)
        payment = {
            "id": paymentId, "token": token, "state": "created", "payer_id": None,
            "executed": False, "total": total, "currency": currency,
            "return_url": urls["return_url"], "cancel_url": urls["cancel_url"],
            "description": transactions[0].get("description"), "redirected_to": None,
        }
        self.payments[paymentId] = payment
        self.byToken[token] = paymentId
        return {
            "id": paymentId, "intent": "sale", "state": "created",
            "payer": {"payment_method": "paypal"}, "transactions": transactions,
            "create_time": _stamp(),
            "links": [
                {"href": f"{self.baseUrl}/v1/payments/payment/{paymentId}", "rel": "self",
                 "method": "GET"},
                {"href": f"{self.baseUrl}/webscr?cmd=_express-checkout&token={token}",
                 "rel": "approval_url", "method": "REDIRECT"},
                {"href": f"{self.baseUrl}/v1/payments/payment/{paymentId}/execute",
                 "rel": "execute", "method": "POST"},
            ],
        }

    def approvalPage(self, request):
        token = (request.args.get(b"token") or [b""])[0].decode()
        paymentId = self.byToken.get(token)
        if paymentId is None:
            request.setResponseCode(404)
            return b"<p>This payment link is not valid.</p>"
        payment = self.payments[paymentId]
        action = (request.args.get(b"action") or [b""])[0].decode() or self.knobs["approval"]
        if action == "cancel":
            target = payment["cancel_url"]
            params = {"token": token}
        else:
            if payment["payer_id"] is None:
                payment["payer_id"] = _id("", 13)
            payment["state"] = "approved"
            target = payment["return_url"]
            params = {"paymentId": paymentId, "token": token, "PayerID": payment["payer_id"]}
        parts = urlsplit(target)
        query = parts.query + ("&" if parts.query else "") + urlencode(params)
        url = urlunsplit(parts._replace(query=query))
        payment["redirected_to"] = url
        request.redirect(url.encode())
        return b""

    def execute(self, paymentId, body):
        payment = self.payments.get(paymentId)
        if payment is None:
            raise Answer(404, "INVALID_RESOURCE_ID", "Requested resource ID was not found.")
        payerId = body.get("payer_id")
        if not payerId:
            raise _validation("payer_id", "Required field missing")
        if payment["executed"]:
            raise Answer(400, "PAYMENT_ALREADY_DONE",
                         "Payment has been done already for this cart.")
        if payment["state"] != "approved":
            raise Answer(400, "PAYMENT_NOT_APPROVED_FOR_EXECUTION",
                         "Payer has not approved payment")
        if payerId != payment["payer_id"]:
            raise Answer(400, "INVALID_PAYER_ID", "Payer ID is invalid")
        if self.knobs["refuse_execute"]:
            raise Answer(400, self.knobs["refuse_execute"],
                         "The instrument presented was either declined by the processor or "
                         "bank, or it can't be used for this payment.")
        payment["executed"] = True
        total = self.knobs["execute_total"] or payment["total"]
        amount = {"total": total, "currency": payment["currency"],
                  "details": {"subtotal": total}}
        return {
            "id": paymentId, "intent": "sale", "state": "approved", "cart": payment["token"],
            "payer": {"payment_method": "paypal", "status": "VERIFIED", "payer_info": {
                "email": "buyer@example.com", "first_name": "Test", "last_name": "Buyer",
                "payer_id": payerId}},
            "transactions": [{
                "amount": amount, "description": payment["description"],
                "related_resources": [{"sale": {
                    "id": _id("", 17), "state": self.knobs["sale_state"], "amount": amount,
                    "payment_mode": "INSTANT_TRANSFER", "parent_payment": paymentId,
                    "create_time": _stamp(), "update_time": _stamp()}}],
            }],
            "create_time": _stamp(), "update_time": _stamp(),
            "links": [{"href": f"{self.baseUrl}/v1/payments/payment/{paymentId}",
                       "rel": "self", "method": "GET"}],
        }

    # -- payouts

    def createPayout(self, body):
        header = body.get("sender_batch_header") or {}
        sender = header.get("sender_batch_id")
        if not sender or len(sender) > 256:
            raise _validation("sender_batch_header.sender_batch_id", "Required field missing")
        items = body.get("items")
        if not isinstance(items, list) or not items:
            raise _validation("items", "Required field missing")
        for i, item in enumerate(items):
            amount = item.get("amount") or {}
            if item.get("recipient_type") != "EMAIL":
                raise _validation(f"items[{i}].recipient_type", "This fake pays emails")
            if not EMAIL.match(item.get("receiver") or ""):
                raise _validation(f"items[{i}].receiver", "Receiver is invalid or does not match "
                                  "with type")
            if not TOTAL.match(str(amount.get("value") or "")) or \
                    not CURRENCY.match(str(amount.get("currency") or "")):
                raise _validation(f"items[{i}].amount", "Currency amount is invalid")
        if sender in self.senderBatchIds:
            raise Answer(400, "USER_BUSINESS_ERROR", "User business error.",
                         [{"field": "SENDER_BATCH_ID",
                           "issue": "Batch with given sender_batch_id already exists"}])
        if self.knobs["payout_refuse"]:
            raise Answer(422, self.knobs["payout_refuse"],
                         "Sender does not have sufficient funds. Please add funds and retry.")
        self.senderBatchIds.add(sender)
        batchId = _id("", 13)
        self.payouts[batchId] = {
            "batch_id": batchId, "header": header, "items": items, "polls": 0,
            "outcome": self.knobs["payout_outcome"], "pending": int(self.knobs["payout_polls"]),
        }
        answer = {
            "batch_header": {"payout_batch_id": batchId, "batch_status": "PENDING",
                             "sender_batch_header": header},
            "links": [{"href": f"{self.baseUrl}/v1/payments/payouts/{batchId}", "rel": "self",
                       "method": "GET"}],
        }
        lost = self.knobs["payout_answer_status"]
        if lost:
            return int(lost), {"name": "INTERNAL_SERVICE_ERROR",
                               "message": "An internal service error has occurred."}
        return 201, answer

    def payoutStatus(self, batchId):
        p = self.payouts.get(batchId)
        if p is None:
            raise Answer(404, "INVALID_RESOURCE_ID", "Requested resource ID was not found.")
        p["polls"] += 1
        item = p["items"][0]
        if p["polls"] <= p["pending"]:
            batchStatus, itemStatus = "PROCESSING", "PENDING"
        elif p["outcome"] == "DENIED":
            batchStatus, itemStatus = "DENIED", None
        else:
            batchStatus, itemStatus = "SUCCESS", p["outcome"]
        items = []
        if itemStatus is not None:
            entry = {
                "payout_item_id": "ITEM" + batchId, "transaction_status": itemStatus,
                "payout_batch_id": batchId, "payout_item": item,
                "payout_item_fee": {"currency": item["amount"]["currency"], "value": "0.00"},
            }
            if itemStatus in ("FAILED", "RETURNED", "BLOCKED"):
                entry["errors"] = {"name": "RECEIVER_ACCOUNT_LOCKED",
                                   "message": "Receiver's account is locked or inactive"}
            items.append(entry)
        return {
            "batch_header": {"payout_batch_id": batchId, "batch_status": batchStatus,
                             "sender_batch_header": p["header"], "time_created": _stamp(),
                             "amount": item["amount"]},
            "items": items,
            "links": [{"href": f"{self.baseUrl}/v1/payments/payouts/{batchId}", "rel": "self",
                       "method": "GET"}],
        }

    # -- control, for tests in another process

    def control(self, request, method, path):
        request.setHeader(b"content-type", b"application/json")
        if path == "/_fake/knobs" and method == "POST":
            changes = json.loads(request.content.read())
            unknown = set(changes) - set(DEFAULT_KNOBS)
            if unknown:
                request.setResponseCode(400)
                return json.dumps({"unknown knobs": sorted(unknown)}).encode()
            self.knobs.update(changes)
            return json.dumps(self.knobs).encode()
        if path == "/_fake/state":
            return json.dumps({
                "payments": list(self.payments.values()),
                "payouts": list(self.payouts.values()),
                "requests": self.requests,
                "knobs": self.knobs,
            }).encode()
        request.setResponseCode(404)
        return b"{}"


def main(argv=None):
    from twisted.internet import reactor

    p = argparse.ArgumentParser(description="A local fake of PayPal's REST endpoints.")
    p.add_argument("--client-id", default="cpushare-test-client")
    p.add_argument("--secret", default="cpushare-test-secret")
    p.add_argument("--address-file", required=True)
    args = p.parse_args(argv)
    fake = FakePayPal(reactor, args.client_id, args.secret)
    port = fake.listen()
    with open(args.address_file + ".tmp", "w") as f:
        json.dump({"port": port.getHost().port}, f)
    os.replace(args.address_file + ".tmp", args.address_file)
    print(f"fake PayPal listening on {fake.baseUrl}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
