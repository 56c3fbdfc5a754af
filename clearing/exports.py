"""Settlement exports of a closed cycle: a CSV for people and an ISO 20022 pain.001 file for the bank.

Why the file looks the way it does: a bank validates a pain.001 upload against the XSD before it reads
a single amount, and rejects the whole file on the first violation. So every length, pattern and
element order the schema fixes (35-character ids, 140-character names, IBAN/BIC/country patterns,
at most 18 digits per amount) is checked here and refused with a `ValueError` naming the field, rather
than discovered by the bank after the cycle is closed. Banks then reconcile the file by `NbOfTxs` and
`CtrlSum` (the file is refused if they disagree with the transfers), match each payment by its
`EndToEndId` (so it must be unique), and pay exactly the decimal text they receive — which is why
amounts go from integer minor units to text by integer arithmetic, never through a float.

Only the network's payables are credit transfers: a pain.001 moves money out of the debtor's account.
What merchants owe the network is collected by other means (their own transfer or a direct debit), so
it appears in the CSV only. The CSV's two TOTAL rows let whoever opens it check the file against the
cycle: pay total - collect total equals the sum of the cycle's instructions (zero when the platform's
own row is included, DESIGN §5).

Both exports are deterministic: the same cycle gives the same bytes whatever the input order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

PAIN001_NAMESPACE = "urn:iso:std:iso:20022:tech:xsd:pain.001.001.09"
CSV_HEADER = ("cycle_id", "merchant_id", "direction", "amount", "currency", "account_name", "iban", "bic")
MAX_NAME_CHARS = 140  # Max140Text
MAX_ID_CHARS = 35  # Max35Text: MsgId, PmtInfId, EndToEndId
MAX_AMOUNT_DIGITS = 18  # totalDigits of amounts and of CtrlSum
MAX_MINOR_UNITS = 3  # ISO 4217 has no currency with more than 3 minor digits
_HASH_SUFFIX_CHARS = 8
NOT_PROVIDED = "NOTPROVIDED"  # EPC convention for an agent identified by IBAN only

_CURRENCY = re.compile(r"[A-Z]{3}")
_COUNTRY = re.compile(r"[A-Z]{2}")
_IBAN = re.compile(r"[A-Z]{2}[0-9]{2}[A-Z0-9]{1,30}")  # IBAN2007Identifier, upper case after compaction
_BIC = re.compile(r"[A-Z0-9]{4}[A-Z]{2}[A-Z0-9]{2}([A-Z0-9]{3})?")  # BICFIDec2014Identifier
# Characters XML 1.0 cannot carry: ElementTree would write them and produce an unparseable file. A
# carriage return is legal, but every parser turns it into a line feed, so it could not arrive as sent.
_NOT_XML = re.compile("[^\t\n\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class Party:
    """A party and its account as ISO 20022 names them; `country` is ISO 3166-1 alpha-2 or empty."""

    name: str
    iban: str
    bic: str
    bank_name: str = ""
    country: str = ""


@dataclass(frozen=True)
class Instruction:
    """One merchant's settlement in a cycle, in integer minor units.

    `settlement_minor` > 0: the network pays the merchant; < 0: the merchant pays the network.
    """

    merchant_id: str
    settlement_minor: int
    party: Party


def format_minor(amount_minor: int, minor_units: int) -> str:
    """Decimal text of an integer count of minor units: (12345, 2) -> "123.45", (-5, 2) -> "-0.05".

    Integer arithmetic only, so the text is exact for any size of amount.
    """
    _check_minor_units(minor_units)
    sign = "-" if amount_minor < 0 else ""
    whole, fraction = divmod(abs(amount_minor), 10**minor_units)
    if minor_units == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:0{minor_units}d}"


def settlement_csv(*, cycle_id: str, currency: str, minor_units: int, instructions: list[Instruction]) -> str:
    """The cycle's settlement as CSV: one row per non-zero instruction, sorted by merchant, then totals.

    Amounts are positive; `direction` says who pays (`pay`: the network pays the merchant, `collect`:
    the merchant owes the network). Two TOTAL rows follow, `pay` then `collect`, always present.
    """
    _check_currency(currency, minor_units)
    _check_text(cycle_id, "cycle_id", max_chars=None)
    _check_unique_merchants(instructions)
    for item in instructions:
        _check_text(item.merchant_id, "merchant_id", max_chars=None)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    pay_minor = collect_minor = 0
    for item in sorted(instructions, key=lambda i: i.merchant_id):
        if item.settlement_minor == 0:
            continue
        if item.settlement_minor > 0:
            direction, pay_minor = "pay", pay_minor + item.settlement_minor
        else:
            direction, collect_minor = "collect", collect_minor - item.settlement_minor
        party = item.party
        amount = format_minor(abs(item.settlement_minor), minor_units)
        iban, bic = _compact(party.iban), _compact(party.bic)
        row = [cycle_id, item.merchant_id, direction, amount, currency, party.name, iban, bic]
        if any("\r" in field for field in row):
            # Python 3.11's writer quotes only the characters of its "\n" terminator: a bare "\r" would go
            # out unquoted and end the row early in any reader that takes it for a line end.
            raise ValueError(f"instruction of {item.merchant_id!r} holds a carriage return, which the CSV cannot carry")
        writer.writerow(row)
    writer.writerow(["TOTAL", "", "pay", format_minor(pay_minor, minor_units), currency, "", "", ""])
    writer.writerow(["TOTAL", "", "collect", format_minor(collect_minor, minor_units), currency, "", "", ""])
    return out.getvalue()


def pain001_xml(
    *,
    message_id: str,
    created_at_ms: int,
    cycle_id: str,
    currency: str,
    minor_units: int,
    debtor: Party,
    instructions: list[Instruction],
) -> bytes:
    """The cycle's payables as one pain.001.001.09 credit transfer initiation (UTF-8, with declaration).

    Each instruction with `settlement_minor` > 0 is a transfer from `debtor` (the network's settlement
    account) to the merchant, sorted by merchant; the others are left out. CreDtTm is UTC to the second
    and ReqdExctnDt is the UTC date of `created_at_ms`. IBANs and BICs are written upper case without
    spaces; a debtor without a BIC is identified as `Othr/Id NOTPROVIDED`; a creditor without one gets
    no CdtrAgt (the bank derives it from the IBAN).

    With no transfer at all the document holds only GrpHdr (NbOfTxs 0, CtrlSum 0 in the currency's
    digits) and the PmtInf is omitted entirely: that file is for the record and is NOT schema-valid
    (pain.001 requires at least one PmtInf with at least one transfer), so do not send it to a bank.
    """
    _check_text(message_id, "message_id", max_chars=MAX_ID_CHARS)
    _check_text(cycle_id, "cycle_id", max_chars=MAX_ID_CHARS)
    _check_currency(currency, minor_units)
    _check_unique_merchants(instructions)
    created = _utc(created_at_ms)
    _check_party(debtor, "debtor")
    transfers = sorted((i for i in instructions if i.settlement_minor > 0), key=lambda i: i.merchant_id)
    for item in transfers:
        _check_text(item.merchant_id, "merchant_id", max_chars=None)
        _check_party(item.party, f"creditor {item.merchant_id!r}")
        _check_digits(item.settlement_minor, f"settlement of {item.merchant_id!r}")
    total_minor = sum(i.settlement_minor for i in transfers)
    _check_digits(total_minor, "control sum")
    count, control_sum = str(len(transfers)), format_minor(total_minor, minor_units)

    document = ET.Element("Document", xmlns=PAIN001_NAMESPACE)
    initiation = ET.SubElement(document, "CstmrCdtTrfInitn")
    header = ET.SubElement(initiation, "GrpHdr")
    _leaf(header, "MsgId", message_id)
    _leaf(header, "CreDtTm", created.strftime("%Y-%m-%dT%H:%M:%SZ"))
    _leaf(header, "NbOfTxs", count)
    _leaf(header, "CtrlSum", control_sum)
    _leaf(ET.SubElement(header, "InitgPty"), "Nm", debtor.name)
    if transfers:
        payment = ET.SubElement(initiation, "PmtInf")
        _leaf(payment, "PmtInfId", cycle_id)
        _leaf(payment, "PmtMtd", "TRF")
        _leaf(payment, "NbOfTxs", count)
        _leaf(payment, "CtrlSum", control_sum)
        _leaf(ET.SubElement(payment, "ReqdExctnDt"), "Dt", created.date().isoformat())
        _party(payment, "Dbtr", debtor)
        _account(payment, "DbtrAcct", debtor)
        _agent(payment, "DbtrAgt", _compact(debtor.bic) or None, other_id=NOT_PROVIDED)
        end_to_end_ids = _end_to_end_ids(cycle_id, [i.merchant_id for i in transfers])
        for item in transfers:
            _transfer(payment, item, end_to_end_ids[item.merchant_id], cycle_id, currency, minor_units)
    ET.indent(document)
    body = ET.tostring(document, encoding="unicode")
    return ('<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n").encode("utf-8")


def _transfer(
    payment: ET.Element, item: Instruction, end_to_end_id: str, cycle_id: str, currency: str, minor_units: int
) -> None:
    # Children in the order CreditTransferTransaction34 fixes: PmtId, Amt, CdtrAgt, Cdtr, CdtrAcct, RmtInf.
    transfer = ET.SubElement(payment, "CdtTrfTxInf")
    _leaf(ET.SubElement(transfer, "PmtId"), "EndToEndId", end_to_end_id)
    amount = _leaf(ET.SubElement(transfer, "Amt"), "InstdAmt", format_minor(item.settlement_minor, minor_units))
    amount.set("Ccy", currency)
    bic = _compact(item.party.bic)
    if bic:
        _agent(transfer, "CdtrAgt", bic, other_id=None)
    _party(transfer, "Cdtr", item.party)
    _account(transfer, "CdtrAcct", item.party)
    _leaf(ET.SubElement(transfer, "RmtInf"), "Ustrd", f"pointsx settlement {cycle_id}")


def _end_to_end_ids(cycle_id: str, merchant_ids: list[str]) -> dict[str, str]:
    """`<cycle_id>-<merchant_id>`, cut to 35 characters; ids whose cut collides get a hash suffix instead."""
    full = {m: f"{cycle_id}-{m}" for m in merchant_ids}
    cut = {m: text[:MAX_ID_CHARS] for m, text in full.items()}
    uses = Counter(cut.values())
    ids: dict[str, str] = {}
    for m, text in full.items():
        if uses[cut[m]] > 1 and len(text) > MAX_ID_CHARS:
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:_HASH_SUFFIX_CHARS]
            ids[m] = f"{text[: MAX_ID_CHARS - _HASH_SUFFIX_CHARS - 1]}-{digest}"
        else:
            ids[m] = cut[m]
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"cannot make unique 35-character EndToEndIds for cycle {cycle_id!r}; shorten the ids")
    return ids


def _leaf(parent: ET.Element, tag: str, text: str) -> ET.Element:
    element = ET.SubElement(parent, tag)
    element.text = text
    return element


def _party(parent: ET.Element, tag: str, party: Party) -> None:
    element = ET.SubElement(parent, tag)
    _leaf(element, "Nm", party.name)
    if party.country:
        _leaf(ET.SubElement(element, "PstlAdr"), "Ctry", party.country)


def _account(parent: ET.Element, tag: str, party: Party) -> None:
    _leaf(ET.SubElement(ET.SubElement(parent, tag), "Id"), "IBAN", _compact(party.iban))


def _agent(parent: ET.Element, tag: str, bic: str | None, *, other_id: str | None) -> None:
    institution = ET.SubElement(ET.SubElement(parent, tag), "FinInstnId")
    if bic:
        _leaf(institution, "BICFI", bic)
    elif other_id:
        _leaf(ET.SubElement(institution, "Othr"), "Id", other_id)


def _compact(identifier: str) -> str:
    """IBANs and BICs are printed in groups for people; banks want them upper case without spaces."""
    return "".join(identifier.split()).upper()


def _utc(created_at_ms: int) -> datetime:
    try:
        # Whole seconds (floor): many banks refuse fractional seconds in CreDtTm.
        return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=created_at_ms // 1000)
    except OverflowError:
        raise ValueError(f"created_at_ms {created_at_ms} is not a representable time") from None


def _check_minor_units(minor_units: int) -> None:
    if not 0 <= minor_units <= MAX_MINOR_UNITS:
        raise ValueError(f"minor_units must be between 0 and {MAX_MINOR_UNITS}, got {minor_units}")


def _check_currency(currency: str, minor_units: int) -> None:
    if not _CURRENCY.fullmatch(currency):
        raise ValueError(f"currency must be an ISO 4217 code of 3 upper-case letters, got {currency!r}")
    _check_minor_units(minor_units)


def _check_text(value: str, field: str, *, max_chars: int | None) -> None:
    if not value:
        raise ValueError(f"{field} must not be empty")
    if max_chars is not None and len(value) > max_chars:
        raise ValueError(f"{field} must be at most {max_chars} characters, got {len(value)}: {value[:40]!r}…")
    if _NOT_XML.search(value):
        raise ValueError(f"{field} holds a character XML cannot carry as sent: {value[:40]!r}")


def _check_party(party: Party, role: str) -> None:
    _check_text(party.name, f"name of {role}", max_chars=MAX_NAME_CHARS)
    iban = _compact(party.iban)
    if not iban:
        raise ValueError(f"{role} has no IBAN: a credit transfer needs the account on both sides")
    if not _IBAN.fullmatch(iban) or not _iban_checksum_ok(iban):
        raise ValueError(f"IBAN of {role} is not a valid IBAN (format or check digits): {party.iban!r}")
    bic = _compact(party.bic)
    if bic and not _BIC.fullmatch(bic):
        raise ValueError(f"BIC of {role} must be 8 or 11 characters as ISO 9362 fixes, got {party.bic!r}")
    if party.country and not _COUNTRY.fullmatch(party.country):
        raise ValueError(f"country of {role} must be ISO 3166-1 alpha-2 (2 upper-case letters), got {party.country!r}")


def _iban_checksum_ok(iban: str) -> bool:
    # ISO 13616: move the first four characters to the end, letters to 10..35, the number mod 97 is 1.
    digits = "".join(str(int(c, 36)) for c in iban[4:] + iban[:4])
    return int(digits) % 97 == 1


def _check_digits(amount_minor: int, field: str) -> None:
    if len(str(abs(amount_minor))) > MAX_AMOUNT_DIGITS:
        raise ValueError(f"{field} has more than {MAX_AMOUNT_DIGITS} digits, which pain.001 cannot carry")


def _check_unique_merchants(instructions: Iterable[Instruction]) -> None:
    seen = Counter(i.merchant_id for i in instructions)
    twice = sorted(m for m, n in seen.items() if n > 1)
    if twice:
        raise ValueError(f"one instruction per merchant and cycle; repeated: {', '.join(twice[:5])}")
