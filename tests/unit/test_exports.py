"""Settlement exports: the CSV's totals and quoting, and pain.001 as a bank would parse and reconcile it."""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ET
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearing.exports import (
    CSV_HEADER,
    PAIN001_NAMESPACE,
    Instruction,
    Party,
    format_minor,
    pain001_xml,
    settlement_csv,
)

NS = {"p": PAIN001_NAMESPACE}
CREATED_AT_MS = 1_795_478_400_000  # 2026-11-24T00:00:00Z
NETWORK = Party(name="pointsx settlement", iban="DE89 3704 0044 0532 0130 00", bic="COBADEFFXXX", country="DE")


def make_iban(country: str, bban: str) -> str:
    """A valid IBAN for any BBAN: ISO 13616 check digits, so tests need no list of real accounts."""
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


def party(name: str, n: int = 1, bic: str = "ABNANL2A", country: str = "NL") -> Party:
    return Party(name=name, iban=make_iban("NL", f"ABNA{n:010d}"), bic=bic, country=country)


def pain(instructions: list[Instruction], *, currency: str = "EUR", minor_units: int = 2, **kw: object) -> ET.Element:
    args: dict[str, object] = {
        "message_id": "msg-0001",
        "created_at_ms": CREATED_AT_MS,
        "cycle_id": "EUR-2026-11-24",
        "currency": currency,
        "minor_units": minor_units,
        "debtor": NETWORK,
        "instructions": instructions,
    }
    args.update(kw)
    data = pain001_xml(**args)  # type: ignore[arg-type]
    assert data.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n')
    return ET.fromstring(data)


def text(element: ET.Element, path: str) -> str:
    found = element.find(path, NS)
    assert found is not None, path
    assert found.text is not None, path
    return found.text


def transfers(document: ET.Element) -> list[ET.Element]:
    return document.findall("p:CstmrCdtTrfInitn/p:PmtInf/p:CdtTrfTxInf", NS)


def csv_rows(instructions: list[Instruction], *, currency: str = "EUR", minor_units: int = 2) -> list[list[str]]:
    data = settlement_csv(cycle_id="c-7", currency=currency, minor_units=minor_units, instructions=instructions)
    return list(csv.reader(io.StringIO(data, newline="")))


def totals(rows: list[list[str]]) -> tuple[Decimal, Decimal]:
    assert rows[-2][:3] == ["TOTAL", "", "pay"] and rows[-1][:3] == ["TOTAL", "", "collect"]
    assert rows[-2][5:] == ["", "", ""] and rows[-1][5:] == ["", "", ""]
    return Decimal(rows[-2][3]), Decimal(rows[-1][3])


MIXED = [
    Instruction("zeta", 12_345, party("Zeta GmbH", 1)),
    Instruction("alpha", -5_000, party("Alpha BV", 2)),
    Instruction("mid", 0, party("Mid", 3)),
    Instruction("beta", 1, party('Beta, "the" shop', 4, bic="", country="")),
    Instruction("gamma", -7, Party(name="Gamma", iban="", bic="")),  # collects: no IBAN needed in pain.001
]


@pytest.mark.parametrize(
    ("amount", "digits", "expected"),
    [
        (12345, 2, "123.45"),
        (-5, 2, "-0.05"),
        (7, 0, "7"),
        (1234, 3, "1.234"),
        (0, 2, "0.00"),
        (0, 0, "0"),
        (-1234, 0, "-1234"),
        (5, 1, "0.5"),
        (10**30 + 1, 2, "10000000000000000000000000000.01"),
    ],
)
def test_format_minor(amount: int, digits: int, expected: str) -> None:
    assert format_minor(amount, digits) == expected
    assert int(expected.replace(".", "")) == amount


@pytest.mark.parametrize("digits", [-1, 4])
def test_format_minor_refuses_digits_outside_0_to_3(digits: int) -> None:
    with pytest.raises(ValueError, match="minor_units"):
        format_minor(1, digits)


def test_pain001_structure_namespace_and_header() -> None:
    doc = pain(MIXED)
    assert doc.tag == f"{{{PAIN001_NAMESPACE}}}Document"
    header = doc.find("p:CstmrCdtTrfInitn/p:GrpHdr", NS)
    assert header is not None
    assert [child.tag.split("}")[1] for child in header] == ["MsgId", "CreDtTm", "NbOfTxs", "CtrlSum", "InitgPty"]
    assert text(header, "p:MsgId") == "msg-0001"
    assert text(header, "p:CreDtTm") == "2026-11-24T00:00:00Z"
    assert text(header, "p:InitgPty/p:Nm") == "pointsx settlement"
    payments = doc.findall("p:CstmrCdtTrfInitn/p:PmtInf", NS)
    assert len(payments) == 1
    payment = payments[0]
    assert [child.tag.split("}")[1] for child in payment] == [
        "PmtInfId",
        "PmtMtd",
        "NbOfTxs",
        "CtrlSum",
        "ReqdExctnDt",
        "Dbtr",
        "DbtrAcct",
        "DbtrAgt",
        "CdtTrfTxInf",
        "CdtTrfTxInf",
    ]
    assert text(payment, "p:PmtInfId") == "EUR-2026-11-24"
    assert text(payment, "p:PmtMtd") == "TRF"
    assert text(payment, "p:ReqdExctnDt/p:Dt") == "2026-11-24"
    assert text(payment, "p:Dbtr/p:Nm") == "pointsx settlement"
    assert text(payment, "p:Dbtr/p:PstlAdr/p:Ctry") == "DE"
    assert text(payment, "p:DbtrAcct/p:Id/p:IBAN") == "DE89370400440532013000"  # spaces removed
    assert text(payment, "p:DbtrAgt/p:FinInstnId/p:BICFI") == "COBADEFFXXX"


def test_pain001_transfers_are_the_positive_instructions_sorted_by_merchant() -> None:
    doc = pain(MIXED)
    txs = transfers(doc)
    assert [text(t, "p:PmtId/p:EndToEndId") for t in txs] == ["EUR-2026-11-24-beta", "EUR-2026-11-24-zeta"]
    assert [text(t, "p:Cdtr/p:Nm") for t in txs] == ['Beta, "the" shop', "Zeta GmbH"]
    beta, zeta = txs
    assert [c.tag.split("}")[1] for c in zeta] == ["PmtId", "Amt", "CdtrAgt", "Cdtr", "CdtrAcct", "RmtInf"]
    assert [c.tag.split("}")[1] for c in beta] == ["PmtId", "Amt", "Cdtr", "CdtrAcct", "RmtInf"]  # no BIC: no CdtrAgt
    assert beta.find("p:Cdtr/p:PstlAdr", NS) is None
    assert text(zeta, "p:Cdtr/p:PstlAdr/p:Ctry") == "NL"
    assert text(zeta, "p:CdtrAgt/p:FinInstnId/p:BICFI") == "ABNANL2A"
    assert text(zeta, "p:CdtrAcct/p:Id/p:IBAN") == make_iban("NL", "ABNA0000000001")
    assert text(zeta, "p:RmtInf/p:Ustrd") == "pointsx settlement EUR-2026-11-24"
    amount = zeta.find("p:Amt/p:InstdAmt", NS)
    assert amount is not None and amount.get("Ccy") == "EUR" and amount.text == "123.45"
    assert text(beta, "p:Amt/p:InstdAmt") == "0.01"


def test_pain001_control_sums_and_counts_agree() -> None:
    doc = pain(MIXED)
    amounts = [Decimal(text(t, "p:Amt/p:InstdAmt")) for t in transfers(doc)]
    positive = sum(i.settlement_minor for i in MIXED if i.settlement_minor > 0)
    for path in ("p:CstmrCdtTrfInitn/p:GrpHdr", "p:CstmrCdtTrfInitn/p:PmtInf"):
        assert text(doc, f"{path}/p:NbOfTxs") == "2"
        assert text(doc, f"{path}/p:CtrlSum") == "123.46"
        assert Decimal(text(doc, f"{path}/p:CtrlSum")) == sum(amounts, Decimal(0)) == Decimal(positive).scaleb(-2)


def test_negative_and_zero_instructions_are_not_transfers() -> None:
    doc = pain([i for i in MIXED if i.settlement_minor <= 0])
    assert transfers(doc) == []
    assert doc.find("p:CstmrCdtTrfInitn/p:PmtInf", NS) is None  # omitted, as documented
    assert text(doc, "p:CstmrCdtTrfInitn/p:GrpHdr/p:NbOfTxs") == "0"
    assert text(doc, "p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum") == "0.00"


@pytest.mark.parametrize(("currency", "digits", "zero"), [("JPY", 0, "0"), ("KWD", 3, "0.000")])
def test_empty_document_control_sum_respects_minor_digits(currency: str, digits: int, zero: str) -> None:
    doc = pain([], currency=currency, minor_units=digits)
    assert text(doc, "p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum") == zero


@pytest.mark.parametrize(
    ("currency", "digits", "amounts", "expected", "control_sum"),
    [
        ("JPY", 0, [12_345, 7], ["12345", "7"], "12352"),
        ("KWD", 3, [1_234, 5], ["1.234", "0.005"], "1.239"),
    ],
)
def test_amounts_in_currencies_with_0_and_3_minor_digits(
    currency: str, digits: int, amounts: list[int], expected: list[str], control_sum: str
) -> None:
    instructions = [Instruction(f"m{a}", a, party(f"M {a}", a)) for a in amounts]
    doc = pain(instructions, currency=currency, minor_units=digits)
    assert [text(t, "p:Amt/p:InstdAmt") for t in transfers(doc)] == expected  # m12345 < m7 as text; m1234 < m5
    assert {t.find("p:Amt/p:InstdAmt", NS).get("Ccy") for t in transfers(doc)} == {currency}  # type: ignore[union-attr]
    assert text(doc, "p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum") == control_sum
    rows = csv_rows(instructions, currency=currency, minor_units=digits)
    assert [r[3] for r in rows[1:-2]] == expected
    assert rows[-2][3] == control_sum and rows[-2][4] == currency


def test_xml_special_characters_in_names_survive_parsing() -> None:
    name = 'Ünïcode & <Sons> "Ltd" \'s 株式会社'
    doc = pain([Instruction("m", 100, party(name))], debtor=Party(name="A & B", iban=NETWORK.iban, bic=""))
    assert text(transfers(doc)[0], "p:Cdtr/p:Nm") == name
    assert text(doc, "p:CstmrCdtTrfInitn/p:GrpHdr/p:InitgPty/p:Nm") == "A & B"
    othr = "p:CstmrCdtTrfInitn/p:PmtInf/p:DbtrAgt/p:FinInstnId/p:Othr/p:Id"
    assert text(doc, othr) == "NOTPROVIDED"  # a debtor without a BIC, EPC style


def test_created_at_is_utc_to_the_second_and_execution_date_is_its_day() -> None:
    doc = pain([Instruction("m", 1, party("M"))], created_at_ms=CREATED_AT_MS - 1)
    assert text(doc, "p:CstmrCdtTrfInitn/p:GrpHdr/p:CreDtTm") == "2026-11-23T23:59:59Z"
    assert text(doc, "p:CstmrCdtTrfInitn/p:PmtInf/p:ReqdExctnDt/p:Dt") == "2026-11-23"


def test_end_to_end_ids_are_cut_to_35_characters_and_stay_unique() -> None:
    cycle = "EUR-2026-11-24T00-00-00Z"  # 24 characters: room for 10 more after the dash
    ids = ["shortid", "long-merchant-0001", "long-merchant-0002", "long-merchant-zzzz", "other-merchant-x"]
    doc = pain([Instruction(m, 10, party(m, n)) for n, m in enumerate(ids)], cycle_id=cycle)
    got = {text(t, "p:Cdtr/p:Nm"): text(t, "p:PmtId/p:EndToEndId") for t in transfers(doc)}
    assert got["shortid"] == f"{cycle}-shortid"
    assert got["other-merchant-x"] == f"{cycle}-other-merc"  # cut, and its cut is unique
    colliding = [got[m] for m in ids[1:4]]
    assert all(e.startswith(f"{cycle}-l-") and len(e) == 35 for e in colliding)
    assert all(len(e) <= 35 for e in got.values()) and len(set(got.values())) == len(ids)
    again = pain(list(reversed([Instruction(m, 10, party(m, n)) for n, m in enumerate(ids)])), cycle_id=cycle)
    assert ET.tostring(again) == ET.tostring(doc)  # input order does not matter


def test_csv_rows_directions_sorting_and_totals() -> None:
    data = settlement_csv(cycle_id="c-7", currency="EUR", minor_units=2, instructions=MIXED)
    assert "\r" not in data and data.endswith("\n")
    rows = list(csv.reader(io.StringIO(data, newline="")))
    assert tuple(rows[0]) == CSV_HEADER
    assert [(r[1], r[2], r[3]) for r in rows[1:-2]] == [
        ("alpha", "collect", "50.00"),
        ("beta", "pay", "0.01"),
        ("gamma", "collect", "0.07"),
        ("zeta", "pay", "123.45"),
    ]  # "mid" settles nothing: no row
    assert rows[1][0] == "c-7" and rows[1][4] == "EUR" and rows[1][5] == "Alpha BV" and rows[1][7] == "ABNANL2A"
    pay, collect = totals(rows)
    pay_minor = sum(i.settlement_minor for i in MIXED if i.settlement_minor > 0)
    collect_minor = -sum(i.settlement_minor for i in MIXED if i.settlement_minor < 0)
    assert pay == Decimal("123.46") == Decimal(pay_minor) / 100
    assert collect == Decimal("50.07") == Decimal(collect_minor) / 100
    assert rows[-2][4] == rows[-1][4] == "EUR"


def test_csv_of_no_settlement_still_has_both_totals() -> None:
    rows = csv_rows([Instruction("m", 0, party("M"))], currency="JPY", minor_units=0)
    assert rows == [
        list(CSV_HEADER),
        ["TOTAL", "", "pay", "0", "JPY", "", "", ""],
        ["TOTAL", "", "collect", "0", "JPY", "", "", ""],
    ]


@pytest.mark.parametrize(
    "name", ["Smith, Jones & Co", 'The "Best" Shop', '"', ",", 'multi\nline, "quoted"', "=SUM(A1)", " padded "]
)
def test_csv_names_round_trip_through_csv_reader(name: str) -> None:
    rows = csv_rows([Instruction("m", -12, party(name)), Instruction("n", 3, party(name + name))])
    assert [r[5] for r in rows[1:-2]] == [name, name + name]
    assert all(len(r) == len(CSV_HEADER) for r in rows)


names = st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from(',"\n'), min_size=1, max_size=140)
instruction_lists = st.lists(
    st.tuples(
        st.from_regex(r"[a-z0-9][a-z0-9_-]{1,40}", fullmatch=True),
        st.integers(min_value=-(10**13), max_value=10**13),
        names,
        st.integers(min_value=0, max_value=10**10 - 1),
        st.booleans(),
    ),
    max_size=30,
    unique_by=lambda t: t[0],
).map(lambda ts: [Instruction(m, s, party(nm, n, bic="ABNANL2A" if b else "")) for m, s, nm, n, b in ts])


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(instruction_lists, st.integers(min_value=0, max_value=3))
def test_exports_agree_with_the_settlements(instructions: list[Instruction], digits: int) -> None:
    scale = Decimal(1).scaleb(-digits)
    rows = csv_rows(instructions, minor_units=digits)
    pay, collect = totals(rows)
    assert pay - collect == Decimal(sum(i.settlement_minor for i in instructions)) * scale
    assert [r[5] for r in rows[1:-2]] == [
        i.party.name for i in sorted(instructions, key=lambda i: i.merchant_id) if i.settlement_minor
    ]
    positive = [i for i in instructions if i.settlement_minor > 0]
    doc = pain(instructions, minor_units=digits)
    control_sum = Decimal(text(doc, "p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum"))
    assert control_sum == Decimal(sum(i.settlement_minor for i in positive)) * scale == pay
    assert control_sum == sum((Decimal(text(t, "p:Amt/p:InstdAmt")) for t in transfers(doc)), Decimal(0))
    assert int(text(doc, "p:CstmrCdtTrfInitn/p:GrpHdr/p:NbOfTxs")) == len(positive) == len(transfers(doc))
    exponent = Decimal(text(doc, "p:CstmrCdtTrfInitn/p:GrpHdr/p:CtrlSum")).as_tuple().exponent
    assert exponent == -digits  # the currency's minor digits, even for a zero sum


def bad(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {"instructions": [Instruction("m", 100, party("M"))]}
    base.update(changes)
    return base


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            bad(instructions=[Instruction("m", 100, Party(name="M", iban="", bic="ABNANL2A"))]),
            "creditor 'm' has no IBAN",
        ),
        (bad(debtor=Party(name="Network", iban="  ", bic="")), "debtor has no IBAN"),
        (bad(instructions=[Instruction("m", 1, party("x" * 141))]), "at most 140 characters"),
        (bad(debtor=Party(name="y" * 141, iban=NETWORK.iban, bic="")), "at most 140 characters"),
        (bad(instructions=[Instruction("m", 1, party(""))]), "must not be empty"),
        (bad(minor_units=4), "minor_units"),
        (bad(minor_units=-1), "minor_units"),
        (bad(currency="usd"), "3 upper-case letters"),
        (bad(currency="US"), "3 upper-case letters"),
        (bad(currency="EURO"), "3 upper-case letters"),
        (bad(instructions=[Instruction("m", 1, Party("M", "NL00ABNA0000000001", ""))]), "not a valid IBAN"),
        (bad(instructions=[Instruction("m", 1, party("M", bic="ABN"))]), "BIC of creditor"),
        (bad(instructions=[Instruction("m", 1, party("M", country="nl"))]), "alpha-2"),
        (bad(instructions=[Instruction("m", 1, party("M\x00"))]), "XML cannot carry"),
        (bad(instructions=[Instruction("m", 1, party("M\rN"))]), "XML cannot carry"),
        (bad(instructions=[Instruction("m", 10**18, party("M"))]), "more than 18 digits"),
        (bad(instructions=[Instruction("m", 1, party("M")), Instruction("m", -1, party("N"))]), "repeated: m"),
        (bad(message_id="x" * 36), "message_id must be at most 35"),
        (bad(cycle_id="c" * 36), "cycle_id must be at most 35"),
        (bad(created_at_ms=10**20), "not a representable time"),
    ],
)
def test_pain001_refuses_what_a_bank_would_reject(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "message_id": "msg",
        "created_at_ms": CREATED_AT_MS,
        "cycle_id": "c",
        "currency": "EUR",
        "minor_units": 2,
        "debtor": NETWORK,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pain001_xml(**args)  # type: ignore[arg-type]


def test_a_merchant_who_only_collects_needs_no_iban_in_either_export() -> None:
    collecting = [Instruction("m", -100, Party(name="M", iban="", bic=""))]
    assert transfers(pain(collecting)) == []
    assert csv_rows(collecting)[1][6] == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"currency": "eur"}, "3 upper-case letters"),
        ({"minor_units": 4}, "minor_units"),
        ({"instructions": [Instruction("m", 1, party("M")), Instruction("m", 2, party("M"))]}, "repeated"),
        ({"instructions": [Instruction("", 1, party("M"))]}, "merchant_id must not be empty"),
        ({"instructions": [Instruction("m", -1, party("M\rN"))]}, "carriage return"),
    ],
)
def test_csv_refuses_bad_input(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"cycle_id": "c", "currency": "EUR", "minor_units": 2, "instructions": []}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        settlement_csv(**args)  # type: ignore[arg-type]
