"""``hf:<dataset>[:<config>][@<split>]``: a Hugging Face dataset read through ``datasets``."""

from __future__ import annotations

from dataclasses import dataclass

from drrl_env import hub
from drrl_env.data.documents import CorpusFormatError, DataNotFoundError, Document
from drrl_env.data.sources import CorpusRequest, Source, hub_fingerprint

DEFAULT_HF_SPLIT = "train"
_OFFLINE_HELP = (
    "Point at local files instead: pass data_path= a .txt file (documents separated by blank "
    "lines, or one per line), a folder of .txt files, or a .jsonl file with text_field= its "
    "text key (on a machine with network access, datasets.load_dataset(...).to_json("
    "'corpus.jsonl') writes one)"
)


@dataclass(frozen=True)
class HubSource(Source):
    """A hub dataset's split (``train`` unless ``@SPLIT``), column ``text_field``; each
    non-empty row is a document."""

    spelling = "hf:<dataset>[:<config>][@<split>]"
    takes_option = True
    rule = "a hub dataset: each non-empty row of the column is a document"

    @classmethod
    def resolve(cls, request: CorpusRequest) -> Source:
        """Parse ``hf:<dataset>[:<config>][@<split>]``.

        Raises:
            ValueError: If ``data_path`` is given, or the dataset id, config or split is empty.
        """
        corpus, option, data_path, text_field = request
        if data_path is not None:
            raise ValueError(
                f"data_path={str(data_path)!r} is not used with corpus={corpus!r}; for local "
                "files pass corpus='text', 'jsonl' or 'folder' (or leave corpus out)"
            )
        spec, at, split = (option or "").partition("@")
        dataset, colon, config = spec.partition(":")
        if not dataset.strip() or (colon and not config.strip()) or (at and not split.strip()):
            raise ValueError(
                f"corpus={corpus!r} is not of the form 'hf:<dataset>[:<config>][@<split>]', "
                "e.g. 'hf:Salesforce/wikitext:wikitext-2-raw-v1@test'"
            )
        return cls(
            corpus,
            "hf",
            text_field=text_field,
            dataset=dataset.strip(),
            config=config.strip() or None,
            hub_split=split.strip() or DEFAULT_HF_SPLIT,
        )

    def fingerprint(self) -> str:
        return hub_fingerprint(self)

    def read(self) -> list[Document]:
        if not hub.hub_reachable():
            raise DataNotFoundError(
                f"corpus={self.corpus!r} is read from the Hugging Face hub, which cannot be used "
                f"({hub.unreachable_reason()}). {_OFFLINE_HELP}"
            )
        from datasets import load_dataset

        try:
            with hub.bounded_hub_timeouts():
                rows = load_dataset(self.dataset, self.config, split=self.hub_split)
        except Exception as exc:  # any hub failure means no data
            raise DataNotFoundError(
                f"corpus={self.corpus!r}: the hub failed ({exc}). {_OFFLINE_HELP}"
            ) from exc
        columns = list(rows.column_names)
        if self.text_field not in columns:
            raise CorpusFormatError(
                f"{self.describe()} has no column {self.text_field!r}; its columns are "
                f"{columns}. Pass text_field= the column that holds the text"
            )
        texts = rows[self.text_field]
        return [Document("", t.strip()) for t in texts if isinstance(t, str) and t.strip()]
