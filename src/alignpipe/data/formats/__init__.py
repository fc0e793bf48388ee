"""Every accepted data format, converted into conversational rows (lists of role/content messages).

Formats (``data.<part>.format``; ``auto`` tells them apart by their fields, see
:mod:`.detect`): ``trl`` and ``hh`` (:mod:`.trl`), ``sharegpt`` (:mod:`.sharegpt`),
``llamafactory`` (:mod:`.llamafactory`), ``oasst`` (:mod:`.oasst`), ``ultrafeedback`` and
``helpsteer`` (:mod:`.rated`). :func:`convert` reads a source into rows of one kind (sft,
prompts, preferences) with content-hash ids; :mod:`.driver` says how drops are counted.
"""

from alignpipe.data.formats.detect import FORMATS, detect
from alignpipe.data.formats.driver import (
    ID_COLUMNS,
    Converted,
    FormatOptions,
    Kind,
    convert,
    convert_source,
    row_id,
)
from alignpipe.data.formats.messages import extract_prompt
from alignpipe.data.formats.rated import ScoredCompletion, scored_completions
from alignpipe.data.formats.trl import hh_to_messages, is_hh, to_preference_row, to_prompt_row, to_sft_row

__all__ = [
    "FORMATS",
    "ID_COLUMNS",
    "Converted",
    "FormatOptions",
    "Kind",
    "ScoredCompletion",
    "convert",
    "convert_source",
    "detect",
    "extract_prompt",
    "hh_to_messages",
    "is_hh",
    "row_id",
    "scored_completions",
    "to_preference_row",
    "to_prompt_row",
    "to_sft_row",
]
