"""CSV imports: row-by-row validation with line numbers, all-or-nothing, prices appended (history kept)."""

from __future__ import annotations

from collections.abc import Callable

from dbhelp import counts
from sqlalchemy.orm import Session

from app import catalog
from app.catalog_rows import GPU_FIELDS

HEADER = "gpu_slug,provider,kind,usd_per_gpu_hour,observed_on,source,note\n"
GOOD = "rtx-4090,runpod,spot,0.29,2026-09-01,https://example.org/runpod-sept,\n"


def test_bad_rows_are_reported_by_line_and_nothing_changes(seeded: Callable[[], Session]) -> None:
    text = (
        HEADER
        + GOOD  # line 2: fine, but must not be imported because others are bad
        + "rtx-4090,runpod,spot,cheap,2026-09-01,https://example.org/x,\n"  # line 3
        + "h100-sxm,aws,on_demand,3.1,2026-02-30,https://example.org/x,\n"  # line 4: no such date
        + "rtx-9999,runpod,spot,0.5,2026-09-01,https://example.org/x,\n"  # line 5: unknown GPU
    )
    with seeded() as s:
        before = counts(s)
        stamp = catalog.catalog_last_updated(s)
        report = catalog.import_prices_csv(s, text)
        s.commit()
        assert counts(s) == before
        assert catalog.catalog_last_updated(s) == stamp
    assert not report.ok and report.inserted == 0
    assert [e.line for e in report.errors] == [3, 4, 5]
    assert "usd_per_gpu_hour" in report.errors[0].message
    assert "observed_on" in report.errors[1].message
    assert "rtx-9999" in report.errors[2].message and "rtx-4090" in report.errors[2].message


def test_duplicate_rows_in_one_file_are_rejected(seeded: Callable[[], Session]) -> None:
    with seeded() as s:
        report = catalog.import_prices_csv(s, HEADER + GOOD + GOOD)
    assert [(e.line, "duplicates line 2" in e.message) for e in report.errors] == [(3, True)]


def test_a_missing_column_is_reported_on_the_header_line(seeded: Callable[[], Session]) -> None:
    with seeded() as s:
        text = "gpu_slug,provider,kind,usd_per_gpu_hour,source\nrtx-4090,a,spot,1,x\n"
        report = catalog.import_prices_csv(s, text)
    assert report.errors[0].line == 1 and "observed_on" in report.errors[0].message


def test_good_import_appends_and_keeps_history(seeded: Callable[[], Session]) -> None:
    with seeded() as s:
        before = counts(s)["price"]
        report = catalog.import_prices_csv(s, HEADER + GOOD)
        s.commit()
        assert report.ok and report.inserted == 1
        # The same file again: already recorded, nothing new.
        again = catalog.import_prices_csv(s, HEADER + GOOD)
        s.commit()
        assert again.ok and again.unchanged == 1 and again.inserted == 0
        assert counts(s)["price"] == before + 1
        spot = catalog.list_prices(s, gpu_slug="rtx-4090", provider="runpod", kind="spot")
        assert [(p.observed_on.isoformat(), p.usd_per_gpu_hour) for p in spot] == [
            ("2026-09-01", 0.29), ("2026-03-01", 0.34)
        ]
        latest = catalog.list_prices(s, gpu_slug="rtx-4090", latest_only=True)
        assert ("runpod", "spot", 0.29) in [(p.provider, p.kind, p.usd_per_gpu_hour) for p in latest]


def test_a_different_price_for_a_recorded_date_is_refused(seeded: Callable[[], Session]) -> None:
    # The seed has RunPod spot RTX 4090 at 0.34 on 2026-03-01; history is never overwritten.
    row = "rtx-4090,runpod,spot,0.99,2026-03-01,https://example.org/x,\n"
    with seeded() as s:
        before = counts(s)
        report = catalog.import_prices_csv(s, HEADER + GOOD + row)
        s.commit()
        assert counts(s) == before
    assert [e.line for e in report.errors] == [3] and "never overwritten" in report.errors[0].message


def test_gpu_import_updates_by_slug_and_validates(seeded: Callable[[], Session]) -> None:
    with seeded() as s:
        gpu = catalog.get_gpu(s, "l4")
        assert gpu is not None
        cols = list(GPU_FIELDS)
        values = {c: getattr(gpu, c) for c in cols}
        values.update(board_power_w=75, source="https://example.org/l4-datasheet-2026")

        def cell(v: object) -> str:
            text = "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
            return f'"{text}"' if "," in text else text

        good = ",".join(cell(values[c]) for c in cols)
        bad = good.replace("l4,", "bad slug!,", 1)
        header = ",".join(cols)

        report = catalog.import_gpus_csv(s, f"{header}\n{good}\n{bad}\n")
        assert [e.line for e in report.errors] == [3] and "slug" in report.errors[0].message
        s.commit()
        unchanged = catalog.get_gpu(s, "l4")
        assert unchanged is not None and unchanged.board_power_w == 72

        report = catalog.import_gpus_csv(s, f"{header}\n{good}\n")
        s.commit()
        assert report.ok and report.updated == 1
        updated = catalog.get_gpu(s, "l4")
        assert updated is not None and updated.board_power_w == 75
