"""
PayPal as the market uses it: an interface, L{IPayPal}, and its
implementation on PayPal's REST SDK (C{paypalrestsdk}), L{RESTPayPal}.

The market asks PayPal for four things:

    createPayment   a payment the buyer approves at PayPal's approval link
    executePayment  completing it once PayPal sent the buyer back
    createPayout    paying a seller's earnings to an email address
    payoutStatus    how that payout is going

Every method returns a Deferred.  The SDK is synchronous (it uses
C{requests}), so L{RESTPayPal} runs it on a thread pool of its own, never
on the reactor thread and never on the store's pool.

Amounts are integer micro-units everywhere in the market; PayPal speaks
decimal strings with two decimals ("20.00").  L{paypalDecimal} and
L{parsePayPalDecimal} convert between them exactly, without floats, and
refuse fractions of a cent.

A failure is a L{PayPalError}: C{definite} says whether PayPal answered
(it refused: nothing happened there) or whether the outcome is unknown
(no answer, a server error, a timeout), which matters for money that may
already have moved.
"""

import ipaddress
import re
from urllib.parse import urlsplit

import attr
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

from cpushare.money import CENT, MICRO, BadAmount, formatAmount

MODES = ("sandbox", "live")
ENDPOINTS = {
    "sandbox": "https://api.sandbox.paypal.com",
    "live": "https://api.paypal.com",
}

# Currencies PayPal takes in whole units only; the market's amounts have
# cents, so it refuses to run in them.
WHOLE_UNIT_CURRENCIES = frozenset({"HUF", "JPY", "TWD"})

# Payout states: a batch's, then its one item's (PayPal's names).
PAYOUT_BATCH_FAILED = frozenset({"DENIED", "CANCELED"})
PAYOUT_ITEM_SENT = frozenset({"SUCCESS"})
PAYOUT_ITEM_FAILED = frozenset({"FAILED", "RETURNED", "BLOCKED", "REFUNDED", "REVERSED",
                                "DENIED", "CANCELED"})


class PayPalError(Exception):
    """
    PayPal refused a request, or could not be asked.  C{name} is PayPal's
    error name (C{INSTRUMENT_DECLINED}) or one of ours; C{definite} is
    True when PayPal answered, False when the outcome is unknown.
    """

    def __init__(self, name, message, definite):
        Exception.__init__(self, f"{message} ({name})")
        self.name = name
        self.message = message
        self.definite = definite


@attr.s(frozen=True)
class ExecutedPayment:
    """
    What PayPal says it completed: the payment's id and state, the amount
    (micro-units, or None when PayPal's text was not an amount) and
    currency, the state of the sale inside it (None when absent) and the
    payer.
    """

    paymentId = attr.ib()
    state = attr.ib()
    amount = attr.ib()
    currency = attr.ib()
    saleState = attr.ib()
    payerId = attr.ib()


@attr.s(frozen=True)
class PayoutStatus:
    """A payout batch's status, its one item's status, and PayPal's note on an error."""

    batchStatus = attr.ib()
    itemStatus = attr.ib()
    error = attr.ib(default=None)

    @property
    def outcome(self):
        """"sent", "failed", or None while PayPal is not done."""
        if self.itemStatus in PAYOUT_ITEM_SENT:
            return "sent"
        if self.itemStatus in PAYOUT_ITEM_FAILED or self.batchStatus in PAYOUT_BATCH_FAILED:
            return "failed"
        return None


class IPayPal(Interface):
    """PayPal's REST operations the market uses; each returns a Deferred."""

    def createPayment(amount, currency, returnUrl, cancelUrl, description):
        """
        Create a payment of C{amount} micro-units (whole cents) for the
        buyer to approve.  Fires with (PayPal's payment id, approval URL).
        """

    def executePayment(paymentId, payerId):
        """Complete an approved payment.  Fires with an L{ExecutedPayment}."""

    def createPayout(senderBatchId, receiverEmail, amount, currency, note):
        """
        Pay C{amount} micro-units to C{receiverEmail}.  C{senderBatchId} is
        ours and unique: PayPal refuses a second batch with the same one.
        Fires with (PayPal's batch id, batch status).
        """

    def payoutStatus(batchId):
        """Fires with the L{PayoutStatus} of a payout batch."""


def paypalDecimal(micro):
    """Micro-units as PayPal's decimal text, "20.00"; fractions of a cent are refused."""
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 0:
        raise BadAmount(f"{micro!r} is not an amount of micro-units")
    if micro % CENT:
        raise BadAmount(f"{formatAmount(micro)} has a fraction of a cent: PayPal takes whole cents")
    return f"{micro // MICRO}.{micro % MICRO // CENT:02d}"


_DECIMAL = re.compile(r"^(\d{1,10})(?:\.(\d{1,2}))?$")


def parsePayPalDecimal(text):
    """PayPal's decimal text ("20.00", "20.5", "20") as micro-units, exactly."""
    match = _DECIMAL.match(str(text))
    if match is None:
        raise BadAmount(f"{text!r} is not an amount PayPal would send")
    whole, cents = match.group(1), (match.group(2) or "").ljust(2, "0")
    return int(whole) * MICRO + int(cents) * CENT


def checkEndpoint(url):
    """
    A PayPal API endpoint as given by the operator, without a trailing
    slash.  It must be https, or http to a loopback address (a local fake
    for tests): the client secret travels in it.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    if parts.query or parts.fragment or parts.path.strip("/"):
        raise ValueError(f"{url!r}: give the endpoint's scheme, host and port only")
    if parts.scheme == "http":
        host = parts.hostname
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            raise ValueError(
                f"{url!r} is plain http to another machine: the client secret would "
                "travel unencrypted; use https")
    return f"{parts.scheme}://{parts.netloc}"


_BATCH_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _sdkApi(mode, clientId, clientSecret, endpoint, timeout):
    import paypalrestsdk

    class Api(paypalrestsdk.Api):
        """The SDK's API with a timeout on every request (it sets none)."""

        def http_call(self, url, method, **kwargs):
            kwargs.setdefault("timeout", timeout)
            return paypalrestsdk.Api.http_call(self, url, method, **kwargs)

    return Api(mode=mode, client_id=clientId, client_secret=clientSecret,
               endpoint=endpoint or ENDPOINTS[mode])


def _errorFromResponse(error):
    """PayPal's error body ({"name", "message", "details"}) as a definite L{PayPalError}."""
    if not isinstance(error, dict):
        return PayPalError("UNKNOWN_ERROR", f"PayPal refused: {error!r}", True)
    name = str(error.get("name") or error.get("error") or "UNKNOWN_ERROR")
    message = str(error.get("message") or error.get("error_description") or "PayPal refused")
    issues = [str(d.get("issue")) for d in error.get("details") or () if isinstance(d, dict)
              and d.get("issue")]
    if issues:
        message += ": " + "; ".join(issues)
    return PayPalError(name, message, True)


def _call(fn, *args):
    """Run one SDK call, turning whatever it raises into a L{PayPalError}."""
    import json

    import requests
    from paypalrestsdk import exceptions

    try:
        return fn(*args)
    except PayPalError:
        raise
    except exceptions.UnauthorizedAccess:
        raise PayPalError("AUTHENTICATION_FAILURE",
                          "PayPal refused the market's client id and secret", True)
    except exceptions.ClientError as e:
        try:
            body = json.loads(e.content or "{}")
        except ValueError:
            body = {"name": f"HTTP_{getattr(e.response, 'status_code', '4xx')}",
                    "message": "PayPal refused the request"}
        raise _errorFromResponse(body)
    except exceptions.ServerError as e:
        raise PayPalError(f"HTTP_{getattr(e.response, 'status_code', '5xx')}",
                          "PayPal had a server error; the outcome is unknown", False)
    except exceptions.ConnectionError as e:
        raise PayPalError("UNEXPECTED_ANSWER", f"PayPal answered oddly: {e}", False)
    except requests.exceptions.Timeout:
        raise PayPalError("TIMEOUT", "PayPal did not answer in time", False)
    except requests.exceptions.RequestException as e:
        raise PayPalError("UNREACHABLE", f"PayPal could not be reached: {e}", False)
    except ValueError as e:
        raise PayPalError("UNEXPECTED_ANSWER", f"PayPal's answer did not parse: {e}", False)


@implementer(IPayPal)
class RESTPayPal:
    """
    L{IPayPal} on PayPal's REST API through C{paypalrestsdk}, on a thread
    pool of its own.  C{endpoint} replaces the mode's API address (the
    sandbox's, or a local fake's in tests); see L{checkEndpoint}.
    """

    def __init__(self, reactor, mode, clientId, clientSecret, endpoint=None,
                 timeout=30.0, threads=2):
        if mode not in MODES:
            raise ValueError(f"PayPal mode {mode!r} is not one of {', '.join(MODES)}")
        self.reactor = reactor
        self.mode = mode
        self.endpoint = checkEndpoint(endpoint or ENDPOINTS[mode])
        self.api = _sdkApi(mode, clientId, clientSecret, self.endpoint, timeout)
        self.pool = ThreadPool(0, threads, name="cpushare-paypal")

    def __repr__(self):
        return f"<RESTPayPal {self.mode} at {self.endpoint}>"

    def start(self):
        self.pool.start()

    def stop(self):
        if self.pool.started and not self.pool.joined:
            self.pool.stop()

    def _run(self, fn, *args):
        return deferToThreadPool(self.reactor, self.pool, _call, fn, *args)

    # -- payments

    def createPayment(self, amount, currency, returnUrl, cancelUrl, description):
        try:
            total = paypalDecimal(amount)
        except BadAmount as e:
            return defer.fail(e)
        return self._run(self._createPayment, total, currency, returnUrl, cancelUrl,
                         description)

    def _createPayment(self, total, currency, returnUrl, cancelUrl, description):
        import paypalrestsdk

        payment = paypalrestsdk.Payment({
            "intent": "sale",
            "payer": {"payment_method": "paypal"},
            "redirect_urls": {"return_url": returnUrl, "cancel_url": cancelUrl},
            "transactions": [{
                "amount": {"total": total, "currency": currency},
                "description": description,
            }],
        }, api=self.api)
        if not payment.create():
            raise _errorFromResponse(payment.error)
        approval = [link.href for link in payment.links or () if link.rel == "approval_url"]
        if not payment.id or not approval:
            raise PayPalError("UNEXPECTED_ANSWER",
                              "PayPal created a payment without an id or approval link", True)
        return str(payment.id), str(approval[0])

    def executePayment(self, paymentId, payerId):
        return self._run(self._executePayment, paymentId, payerId)

    def _executePayment(self, paymentId, payerId):
        import paypalrestsdk

        payment = paypalrestsdk.Payment({"id": paymentId}, api=self.api)
        if not payment.execute({"payer_id": payerId}):
            raise _errorFromResponse(payment.error)
        return executedFromDict(payment.to_dict())

    # -- payouts

    def createPayout(self, senderBatchId, receiverEmail, amount, currency, note):
        try:
            value = paypalDecimal(amount)
        except BadAmount as e:
            return defer.fail(e)
        return self._run(self._createPayout, senderBatchId, receiverEmail, value, currency, note)

    def _createPayout(self, senderBatchId, receiverEmail, value, currency, note):
        import paypalrestsdk

        payout = paypalrestsdk.Payout({
            "sender_batch_header": {
                "sender_batch_id": senderBatchId,
                "email_subject": "You have a payment from the CPUShare market",
            },
            "items": [{
                "recipient_type": "EMAIL",
                "amount": {"value": value, "currency": currency},
                "receiver": receiverEmail,
                "note": note,
                "sender_item_id": senderBatchId,
            }],
        }, api=self.api)
        if not payout.create(sync_mode=False):
            raise _errorFromResponse(payout.error)
        header = payout.batch_header
        batchId = header and header.payout_batch_id
        if not batchId or not _BATCH_ID.match(str(batchId)):
            raise PayPalError("UNEXPECTED_ANSWER",
                              f"PayPal accepted the payout without a usable batch id: {batchId!r}",
                              False)
        return str(batchId), str(header.batch_status or "")

    def payoutStatus(self, batchId):
        if not _BATCH_ID.match(batchId):
            return defer.fail(ValueError(f"{batchId!r} is not a PayPal payout batch id"))
        return self._run(self._payoutStatus, batchId)

    def _payoutStatus(self, batchId):
        # The SDK's Payout.find builds ".../payouts/ID/ID" on Python 3.7 and
        # later (its join_url meets re.sub's newer empty-match rule), so the
        # lookup goes through the SDK's Api directly.
        answer = self.api.get("v1/payments/payouts/" + batchId)
        if "error" in answer:
            raise _errorFromResponse(answer["error"])
        return payoutStatusFromDict(answer)


def executedFromDict(answer):
    """An L{ExecutedPayment} from PayPal's answer to an execute request."""
    transactions = answer.get("transactions") or [{}]
    amount = transactions[0].get("amount") or {}
    try:
        micro = parsePayPalDecimal(amount.get("total"))
    except BadAmount:
        micro = None
    saleState = None
    for related in transactions[0].get("related_resources") or ():
        if isinstance(related, dict) and "sale" in related:
            saleState = related["sale"].get("state")
    payer = (answer.get("payer") or {}).get("payer_info") or {}
    return ExecutedPayment(
        paymentId=answer.get("id"), state=answer.get("state"), amount=micro,
        currency=amount.get("currency"), saleState=saleState, payerId=payer.get("payer_id"),
    )


def payoutStatusFromDict(answer):
    """A L{PayoutStatus} from PayPal's answer about a payout batch."""
    header = answer.get("batch_header") or {}
    items = answer.get("items") or [{}]
    item = items[0]
    errors = item.get("errors") or {}
    error = errors.get("message") or errors.get("name") if isinstance(errors, dict) else None
    return PayoutStatus(
        batchStatus=str(header.get("batch_status") or ""),
        itemStatus=str(item.get("transaction_status") or ""),
        error=error,
    )
