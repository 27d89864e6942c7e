"""Web image search by class lemmas: Openverse and Flickr, as ImageNet's own collection asked
search engines, with the parent synset's lemma added to disambiguate ("crane bird").

One unit per class. Queries are the class's own lemmas (those no other class shares), each
followed by its nearest hypernym's first lemma; results are paged, query by query, until
``wanted`` distinct images are found or the results run out. Candidates are URLs (the
acquire stage downloads them in rounds) ranked by query order then result rank; licence,
creator and landing page go into provenance.

Credentials come from environment variables only (``OPENVERSE_TOKEN``, optional;
``FLICKR_API_KEY``, required for Flickr) and are never logged, printed, or written to the
manifest or samples: API errors are reported without the request URL.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlencode

from .base import Candidate, ResourceError, Resources, Unit, class_units, unit_class
from .labels import ImageNetClass
from .lemma_match import class_lemmas, words

ENDPOINTS = {"openverse": "https://api.openverse.org/v1/images/",
             "flickr": "https://api.flickr.com/services/rest/"}  # fmt: skip
CREDENTIALS = {"openverse": "OPENVERSE_TOKEN", "flickr": "FLICKR_API_KEY"}
# Flickr's licence ids (flickr.photos.licenses.getInfo) as SPDX-style names.
FLICKR_LICENSES = {"0": "all-rights-reserved", "1": "CC-BY-NC-SA-2.0", "2": "CC-BY-NC-2.0",
                   "3": "CC-BY-NC-ND-2.0", "4": "CC-BY-2.0", "5": "CC-BY-SA-2.0",
                   "6": "CC-BY-ND-2.0", "7": "no-known-copyright-restrictions",
                   "8": "US-government-work", "9": "CC0-1.0", "10": "PDM-1.0"}  # fmt: skip
NO_FLICKR_KEY = f"flickr needs an API key in the environment variable {CREDENTIALS['flickr']}"


def credential(provider: str) -> str:
    """The provider's credential from the environment ('' when unset): read where it is used,
    never stored on an object that could be logged or pickled into a result."""
    return os.environ.get(CREDENTIALS[provider], "").strip()


DEFAULT_LICENSES = {"openverse": ["by", "by-sa", "cc0", "pdm"], "flickr": ["4", "5", "9", "10"]}


@dataclass
class WebSearchParams:
    provider: Literal["openverse", "flickr"] = "openverse"
    endpoint: str | None = None  # default: the provider's public API
    licenses: list[str] = field(default_factory=list)  # default: commercial-use friendly ones
    wanted: int = 1500  # distinct images per class to collect (target plus margin)
    page_size: int = 20  # Openverse's anonymous limit; Flickr allows up to 500
    max_pages: int = 50  # per query
    parent: bool = True  # add the parent synset's lemma to every query
    allow_networks: list[str] = field(default_factory=list)  # CIDRs allowed though private
    timeout: float = 10.0
    retries: int = 3

    def check(self) -> dict[str, str]:
        problems = {}
        if self.provider == "flickr" and not credential("flickr"):
            problems["provider"] = NO_FLICKR_KEY
        for name in ("wanted", "page_size", "max_pages"):
            if getattr(self, name) < 1:
                problems[name] = "must be at least 1"
        if self.provider == "openverse" and self.page_size > 500:
            problems["page_size"] = "Openverse pages hold at most 500 results"
        return problems


@dataclass(frozen=True)
class WebImage:
    url: str
    id: str
    title: str | None
    license: str | None
    creator: str | None
    landing_page: str | None


class WebSearchCurator:
    """The look-up shape against a web API: one unit per class, URL candidates."""

    Params = WebSearchParams
    name = "web_search"
    resources = Resources(cpus=1.0)
    license = None  # per sample, from the provider

    def __init__(self, params: WebSearchParams) -> None:
        self.params = params
        self._fetcher = None
        self._own: dict[int, list[tuple[str, ...]]] | None = None

    def units(self, classes: Sequence[ImageNetClass]) -> list[Unit]:
        return class_units(classes)

    @property
    def model(self) -> dict[str, str | None]:
        return {"name": f"{self.params.provider} image search", "weights": None}

    def queries(self, cls: ImageNetClass) -> list[str]:
        """The class's own lemmas (in WordNet's order), each with its parent's first lemma."""
        if self._own is None:
            from .labels import label_set

            own: dict[int, list[tuple[str, ...]]] = {}
            for seq, label in class_lemmas(label_set()).items():
                own.setdefault(label, []).append(seq)
            self._own = own
        mine = set(self._own.get(cls.index, []))
        lemmas = [lemma for lemma in dict.fromkeys(cls.lemmas) if tuple(words(lemma)) in mine]
        parent = cls.parent_lemmas[0] if self.params.parent and cls.parent_lemmas else ""
        out = []
        for lemma in lemmas or [cls.name]:
            extra = "" if not parent or set(words(parent)) <= set(words(lemma)) else f" {parent}"
            out.append(f"{lemma}{extra}")
        return out

    def _fetch(self):
        if self._fetcher is None:
            from shards.fetch import Fetcher, FetchPolicy

            p = self.params
            policy = FetchPolicy(
                read_timeout=p.timeout, retries=p.retries, per_host=4,
                allow_networks=tuple(p.allow_networks), max_bytes=8 << 20,
                accept_types=("application/json", "text/json", "text/javascript"),
            )  # fmt: skip
            self._fetcher = Fetcher(policy)
        return self._fetcher

    def _get(self, params: dict, headers: dict) -> dict:
        p = self.params
        endpoint = p.endpoint or ENDPOINTS[p.provider]
        got = self._fetch().fetch(f"{endpoint}?{urlencode(params)}", headers)
        if got.data is None:  # the reason without the URL: it may hold the API key
            status = f"HTTP {got.http_status}" if got.http_status else got.kind
            if got.http_status in (401, 403):
                raise ResourceError(f"{p.provider} refused the credentials ({status})")
            raise ResourceError(f"{p.provider} search failed: {status}")
        try:
            return json.loads(got.data)
        except ValueError:
            raise ResourceError(f"{p.provider} answered something that is not JSON") from None

    def search(self, query: str, page: int) -> tuple[list[WebImage], bool]:
        """One page of results and whether more pages exist."""
        p = self.params
        licenses = p.licenses or DEFAULT_LICENSES[p.provider]
        if p.provider == "openverse":
            token = credential("openverse")
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            body = self._get({"q": query, "page": page, "page_size": p.page_size,
                              "license": ",".join(licenses)}, headers)  # fmt: skip
            images = [
                WebImage(r["url"], str(r.get("id")), r.get("title"),
                         _openverse_license(r), r.get("creator"), r.get("foreign_landing_url"))
                for r in body.get("results", []) if r.get("url")
            ]  # fmt: skip
            return images, page < int(body.get("page_count") or 0)
        key = credential("flickr")
        if not key:
            raise ResourceError(NO_FLICKR_KEY)
        body = self._get({
            "method": "flickr.photos.search", "api_key": key, "text": query, "page": page,
            "per_page": p.page_size, "license": ",".join(licenses), "sort": "relevance",
            "content_type": 1, "media": "photos", "extras": "url_c,owner_name,license",
            "format": "json", "nojsoncallback": 1,
        }, {})  # fmt: skip
        if body.get("stat") != "ok":
            raise ResourceError(f"flickr search failed: {body.get('message') or body.get('stat')}")
        photos = body.get("photos") or {}
        images = []
        for r in photos.get("photo", []):
            url = r.get("url_c") or f"https://live.staticflickr.com/{r['server']}/{r['id']}_{r['secret']}_b.jpg"  # fmt: skip
            images.append(WebImage(url, str(r["id"]), r.get("title"),
                                   FLICKR_LICENSES.get(str(r.get("license")), str(r.get("license"))),
                                   r.get("ownername"),
                                   f"https://www.flickr.com/photos/{r.get('owner')}/{r['id']}"))  # fmt: skip
        return images, page < int(photos.get("pages") or 0)

    def candidates(self, unit: Unit) -> Iterator[Candidate]:
        cls, p = unit_class(unit), self.params
        seen: set[str] = set()
        rank = 0
        for query in self.queries(cls):
            for page in range(1, p.max_pages + 1):
                images, more = self.search(query, page)
                for img in images:
                    if img.url in seen:
                        continue
                    seen.add(img.url)
                    rank += 1
                    yield Candidate(
                        label=cls.index, source_id=f"{p.provider}:{img.id}",
                        score=round(1.0 / rank, 9), query_kind="lemma", query_value=query,
                        source_dataset=p.provider, url=img.url, caption=img.title,
                        license=img.license, locator={"kind": "url", "url": img.url},
                        creator=img.creator, landing_page=img.landing_page,
                    )  # fmt: skip
                    if rank >= p.wanted:
                        return
                if not more or not images:
                    break


def _openverse_license(r: dict) -> str | None:
    name, version = r.get("license"), r.get("license_version")
    if not name:
        return None
    return (
        f"CC-{name.upper()}-{version}" if name not in ("cc0", "pdm") and version else name.upper()
    )
