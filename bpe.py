"""
bpe.py: slimchat's tokenizer, a byte-level BPE in the GPT-4 style, in pure Python + numpy.

- Text is first split into chunks with SPLIT_PATTERN (the `regex` package), then each chunk's
  UTF-8 bytes are merged pair by pair. Ids 0..255 are the raw bytes, 256+i is merge i, and the
  9 SPECIAL_TOKENS come last, in order. `vocab_size` counts the specials.
- Training counts unique chunks (in worker processes), then merges over the unique chunks with
  incremental pair-count updates and a max-heap with lazy refresh, like rustbpe. On equal
  counts the smallest pair (a, b) wins, so the vocabulary is deterministic. Memory grows with
  the number of unique chunks, not with the text size.
- `encode` treats special-token text as plain text; special ids come only from `special(name)`
  and the chat renderer. A chunk cache makes a repeated chunk cost one dict look-up.
- `render_conversation` turns a chat into (ids, loss mask), REFERENCE.md §1.4. Truncation to
  max_tokens keeps whole turns, so it never cuts between a pair of special tokens.
- Artifact: one JSON file (format name + version, pattern, merges, specials), by default
  $SLIMCHAT_HOME/tokenizer/tokenizer.json.

CLI:
  python bpe.py train [--vocab_size=65536] [--max_chars=2000000000] [--data=DIR] [--out=PATH]
  python bpe.py eval  [--data=DIR] [--path=PATH]
"""
import codecs
import hashlib
import heapq
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from itertools import chain

import numpy as np
import regex

# GPT-4's split pattern with \p{N}{1,2} instead of {1,3}: nanochat measured val_bpb 0.965 for
# {1,2} against 0.972 for {1,3} at d12 / 32K vocab (REFERENCE.md §1.1).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
                 r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                  "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                  "<|output_start|>", "<|output_end|>"]
FORMAT_NAME = "slimchat-bpe"    # tells our tokenizer file apart from any other JSON
FORMAT_VERSION = 1
TRAIN_BATCH_DOCS = 512          # texts per worker task while counting chunks
PAIR_KEY = 1 << 24              # the trainer stores pair (a, b) as a * PAIR_KEY + b
CACHE_MAX = 1 << 20             # chunk-cache entries before the cache is cleared (bounds memory)
VAL_SHARD = "shard_01822.parquet"
DOC_CAP = 10_000                # chars per document used for training (REFERENCE.md §1.1)

# ---------------------------------------------------------------------------
# pure helpers: the slow, obvious BPE steps (also the reference the fast code is tested against)

def pair_counts(ids, counts=None):
    """Count adjacent pairs: pair_counts([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}."""
    counts = {} if counts is None else counts
    for pair in zip(ids, ids[1:]):
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def merge(ids, pair, new_id):
    """Replace every non-overlapping `pair`, left to right: merge([7, 8, 9, 7, 8], (7, 8), 300) == [300, 9, 300]."""
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out

# ---------------------------------------------------------------------------
# training: count unique chunks (in parallel), then merge over them incrementally

_SPLIT_RE = regex.compile(SPLIT_PATTERN)


def _count_batch(texts):
    """Chunk frequencies of a list of texts (runs in a worker process)."""
    counts = Counter()
    for text in texts:
        counts.update(_SPLIT_RE.findall(text))
    return counts


def _batches(texts, size):
    batch = []
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"training texts must be str, got {type(text).__name__}")
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def count_chunks(texts, workers=0):
    """{chunk: count} over an iterable of str. workers > 1 splits in that many processes; at most
    2*workers batches are in flight, so memory is bounded by the unique chunks, not the text."""
    total = Counter()

    def add(counts):
        if not total:
            total.update(counts)   # fast path: plain dict update
            return
        get = total.get
        for chunk, n in counts.items():
            total[chunk] = get(chunk, 0) + n

    if workers <= 1:
        for batch in _batches(texts, TRAIN_BATCH_DOCS):
            add(_count_batch(batch))
        return total
    with multiprocessing.Pool(workers) as pool:
        pending = []
        for batch in _batches(texts, TRAIN_BATCH_DOCS):
            pending.append(pool.apply_async(_count_batch, (batch,)))
            if len(pending) >= 2 * workers:
                add(pending.pop(0).get())
        for job in pending:
            add(job.get())
    return total


def _runs(keys):
    """Start index of each run of equal values in a sorted array: _runs([3, 3, 5, 7, 7]) -> [0, 2, 3]."""
    return np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))


def _linked_words(chunk_counts):
    """All unique chunks' bytes in one array `tok`, as doubly linked lists (nxt/prv, -1 at the
    ends of a word), with `wgt` = the count of the word each position belongs to."""
    try:
        encoded = [chunk.encode("utf-8") for chunk in chunk_counts]
    except UnicodeEncodeError as e:
        raise ValueError(f"training text contains a lone surrogate ({e.object!r:.60}); "
                         "it is not valid Unicode, fix or drop that document") from None
    lens = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    counts = np.fromiter(chunk_counts.values(), dtype=np.int64, count=len(encoded))
    tok = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int32)   # int32 halves memory
    n, ends = len(tok), np.cumsum(lens) - 1
    if n >= 2**31:
        raise ValueError(f"{n:,} bytes of unique chunks do not fit int32 positions; train on less text")
    nxt, prv = np.arange(1, n + 1, dtype=np.int32), np.arange(-1, n - 1, dtype=np.int32)
    nxt[ends], prv[ends[:-1] + 1] = -1, -1
    return tok, nxt, prv, np.repeat(counts, lens)


def train_merges(chunk_counts, num_merges, log_every=0):
    """Learn up to `num_merges` merges from {chunk: count}; returns [(a, b), ...] in rank order.

    Same result as recounting every pair after every merge (the reference in tests/test_bpe.py),
    but incremental, like rustbpe: a pair (a, b) is the int key a*PAIR_KEY + b; `totals` holds
    each pair's count (weighted by chunk counts) and `where` the positions it was created at.
    A merge visits only its own positions (vectorised with numpy over the linked words) and
    updates the counts of the pairs around them. A min-heap of (-count, key) yields the most
    frequent pair, the smallest (a, b) on ties. Counts of existing pairs only go down (pairs
    created by a merge contain the new id), so a stale heap entry is re-pushed with its current
    count when popped (lazy refresh), and a stale position is filtered out when its pair merges."""
    tok, nxt, prv, wgt = _linked_words(chunk_counts)
    consumed = np.zeros(len(tok), dtype=bool)   # scratch marks, all False between merges
    pos = np.flatnonzero(nxt >= 0).astype(np.int32)
    keys = tok[pos].astype(np.int64) * PAIR_KEY + tok[pos + 1]
    order = np.argsort(keys, kind="stable")
    where, totals = {}, {}
    heap = [(-c, k) for k, c in _add_fresh(keys[order], pos[order], wgt, where, totals)]
    heapq.heapify(heap)
    merges, t0 = [], time.time()
    shown = [bytes([i]) for i in range(256)]   # token bytes, for the progress log
    while len(merges) < num_merges and heap:
        neg, key = heapq.heappop(heap)
        current = totals.get(key, 0)
        if current != -neg:
            if current > 0:
                heapq.heappush(heap, (-current, key))
            continue
        a, b = divmod(key, PAIR_KEY)
        new_id = 256 + len(merges)
        merges.append((a, b))
        del totals[key]
        p = where.pop(key)
        q = nxt[p]
        p = p[(tok[p] == a) & (tok[q] == b) & (q >= 0)]   # drop positions an earlier merge changed
        if a == b:   # in a run "a a a" take occurrences left to right, skipping overlaps
            p, chosen, keep = np.sort(p), set(), []
            for x, left in zip(p.tolist(), prv[p].tolist()):
                if left not in chosen:
                    chosen.add(x)
                    keep.append(x)
            p = np.array(keep, dtype=np.int32)
        q, w = nxt[p], wgt[p]
        l, r = prv[p], nxt[q]
        hr = r >= 0
        # in "a b a b" the left neighbour of the 2nd occurrence is the 1st one's b: that pair
        # is the 1st occurrence's right pair, so count it once
        consumed[q] = True
        hl = (l >= 0) & ~consumed[l]
        consumed[q] = False
        l, lt = l[hl], tok[l[hl]].astype(np.int64) * PAIR_KEY   # left ids, shifted into keys
        gone = np.concatenate((lt + a, b * PAIR_KEY + tok[r[hr]].astype(np.int64)))
        gone_w = np.concatenate((w[hl], w[hr]))
        # the merge itself: p takes the new id, q leaves its linked list
        tok[p], tok[q], nxt[p] = new_id, -1, r
        p, r = p[hr], r[hr]
        prv[r] = p
        # the pairs (left, a) and (b, right) lose counts; (left, new) and (new, right) appear
        if len(gone):
            order = np.argsort(gone)
            gone, gone_w = gone[order], gone_w[order]
            starts = _runs(gone)
            for k, c in zip(gone[starts].tolist(), np.add.reduceat(gone_w, starts).tolist()):
                if k == key:
                    continue  # a skipped overlap in "a a a": that pair is gone altogether
                c = totals[k] - c
                if c:
                    totals[k] = c
                else:
                    del totals[k]
                    where.pop(k, None)
        made = np.concatenate((lt + new_id, new_id * PAIR_KEY + tok[r].astype(np.int64)))
        made_pos = np.concatenate((l, p))
        order = np.argsort(made, kind="stable")
        for k, c in _add_fresh(made[order], made_pos[order], wgt, where, totals):
            heapq.heappush(heap, (-c, k))
        if log_every:
            shown.append(shown[a] + shown[b])
            if len(merges) % log_every == 0:
                print(f"merge {len(merges):,}/{num_merges:,}: {shown[-1]!r} count {current:,} "
                      f"({time.time() - t0:.1f}s)", flush=True)
    return merges


def _add_fresh(keys, pos, wgt, where, totals):
    """Register new pairs given their sorted keys and positions; returns [(key, count)]."""
    if not len(keys):
        return []
    starts = _runs(keys)
    sums = np.add.reduceat(wgt[pos], starts).tolist()
    bounds = starts.tolist() + [len(keys)]
    added = []
    for i, k in enumerate(keys[starts].tolist()):
        where[k] = pos[bounds[i]:bounds[i + 1]]
        totals[k] = sums[i]
        added.append((k, sums[i]))
    return added

# ---------------------------------------------------------------------------
# the tokenizer

def encode_chunk(chunk, ranks):
    """Ids of one chunk: merge the adjacent pair with the lowest merged id, leftmost first, until
    none is in `ranks` ({(a, b): merged id}). Equals applying the merges in training order.
    `pair_ranks[j]` is the merged id of (ids[j], ids[j+1]); only the two around a merge change."""
    try:
        ids = list(chunk.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ValueError(f"text contains a lone surrogate {chunk[e.start]!r} (in chunk {chunk!r}), "
                         "which is not valid Unicode; fix the text, e.g. "
                         "s.encode('utf-16', 'surrogatepass').decode('utf-16')") from None
    get, none = ranks.get, 1 << 62
    pair_ranks = [get(p, none) for p in zip(ids, ids[1:])]
    while pair_ranks:
        best = min(pair_ranks)
        if best == none:
            break
        j = pair_ranks.index(best)
        ids[j:j + 2] = [best]
        del pair_ranks[j]
        if j > 0:
            pair_ranks[j - 1] = get((ids[j - 1], best), none)
        if j < len(pair_ranks):
            pair_ranks[j] = get((best, ids[j + 1]), none)
    return tuple(ids)


class _ChunkCache(dict):
    """chunk -> ids; a miss encodes the chunk, so a hit never leaves C. Cleared when full."""

    def __init__(self, ranks):
        super().__init__()
        self.ranks = ranks

    def __missing__(self, chunk):
        if len(self) >= CACHE_MAX:
            self.clear()
        ids = self[chunk] = encode_chunk(chunk, self.ranks)
        return ids


class StreamDecoder:
    """Turns ids into text one at a time, never emitting half a UTF-8 character."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id):
        return self._utf8.decode(self._tok.decode_bytes([token_id]))

    def flush(self):
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Byte-level BPE: ids 0..255 bytes, 256+i merge i, then SPECIAL_TOKENS."""

    def __init__(self, merges, pattern=SPLIT_PATTERN):
        self.pattern = pattern
        self.merges = [tuple(p) for p in merges]
        self._regex = regex.compile(pattern)
        self._ranks = {}   # (a, b) -> merged id; lower id = earlier merge = higher priority
        self._bytes = [bytes([i]) for i in range(256)]
        for i, (a, b) in enumerate(self.merges):
            new_id = 256 + i
            if not (0 <= a < new_id and 0 <= b < new_id) or (a, b) in self._ranks:
                raise ValueError(f"merge {i} {(a, b)} refers to an unknown id or repeats a pair")
            self._ranks[(a, b)] = new_id
            self._bytes.append(self._bytes[a] + self._bytes[b])
        self.n_ranks = len(self._bytes)
        self._special_ids = {name: self.n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._bytes += [name.encode("utf-8") for name in SPECIAL_TOKENS]
        self.vocab_size = len(self._bytes)
        self.bos_id = self._special_ids["<|bos|>"]
        self._cache = _ChunkCache(self._ranks)
        self._pool, self._pool_size = None, 0

    # --- training ----------------------------------------------------------------------------
    @classmethod
    def train(cls, texts, vocab_size, workers=0, verbose=False):
        """Train on an iterable of str. vocab_size counts the 256 bytes and the 9 specials. If the
        text runs out of pairs first, training stops early and the vocab is smaller (printed)."""
        if isinstance(texts, (str, bytes)):
            raise ValueError("train() takes an iterable of texts, not one text: wrap it in a list")
        min_size = 256 + len(SPECIAL_TOKENS)
        if not min_size <= vocab_size <= PAIR_KEY:
            raise ValueError(f"vocab_size must be from {min_size} (256 bytes + {len(SPECIAL_TOKENS)} "
                             f"specials) to {PAIR_KEY:,}, got {vocab_size}")
        t0 = time.time()
        chunks = count_chunks(texts, workers)
        if verbose:
            print(f"counted {len(chunks):,} unique chunks in {time.time() - t0:.1f}s", flush=True)
        num_merges = vocab_size - min_size
        merges = train_merges(chunks, num_merges, log_every=max(1, num_merges // 20) if verbose else 0)
        if len(merges) < num_merges:
            print(f"bpe: the text ran out of pairs after {len(merges)} of {num_merges} merges; "
                  f"vocab_size is {len(merges) + min_size}, not {vocab_size}", flush=True)
        return cls(merges)

    # --- encoding ----------------------------------------------------------------------------
    def special(self, name):
        """Id of a special token, e.g. special("<|bos|>")."""
        if name not in self._special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self._special_ids[name]

    def encode(self, text):
        """Text -> ids. Special-token text is plain text here."""
        if not isinstance(text, str):
            raise ValueError(f"encode expects str, got {type(text).__name__}")
        return list(chain.from_iterable(map(self._cache.__getitem__, self._regex.findall(text))))

    def encode_batch(self, texts, workers=0):
        """encode() over a list; workers > 1 spreads the texts over that many processes. The pool
        is started on first use and kept (each worker keeps its warm chunk cache across calls),
        until close() or exit."""
        if workers <= 1:
            return [self.encode(t) for t in texts]
        if self._pool is None or self._pool_size != workers:
            self.close()
            self._pool = multiprocessing.Pool(workers, initializer=_worker_init, initargs=(self.merges, self.pattern))
            self._pool_size = workers
        return self._pool.map(_worker_encode, texts, chunksize=max(1, len(texts) // (4 * workers)))

    def close(self):
        """Stop encode_batch's worker processes, if any."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def __reduce__(self):
        return Tokenizer, (self.merges, self.pattern)   # pickles as its merges: no pool, no cache

    # --- decoding ----------------------------------------------------------------------------
    def decode_bytes(self, ids):
        """Ids -> the raw bytes they stand for (special ids give their names)."""
        ids = list(ids)
        try:
            if not ids or min(ids) >= 0:   # a negative index would silently wrap around
                return b"".join([self._bytes[i] for i in ids])
        except (IndexError, TypeError):
            pass
        bad = [i for i in ids if not (isinstance(i, (int, np.integer)) and 0 <= i < self.vocab_size)]
        raise ValueError(f"invalid token id(s) {bad[:5]} (vocab_size {self.vocab_size})")

    def decode(self, ids):
        """Ids -> text; special ids decode to their names, broken UTF-8 to U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self):
        return StreamDecoder(self)

    def token_bytes(self):
        """Raw byte length of every id (0 for specials): the denominator of bits-per-byte."""
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        lengths[:self.n_ranks] = [len(b) for b in self._bytes[:self.n_ranks]]
        return lengths

    def mergeable_ranks(self):
        """{token bytes: id} for the BPE ids, the form tiktoken-like libraries load."""
        return {b: i for i, b in enumerate(self._bytes[:self.n_ranks])}

    # --- chat rendering ----------------------------------------------------------------------
    def render_conversation(self, conversation, max_tokens=2048):
        """Conversation -> (ids, mask), REFERENCE.md §1.4: mask 1 on what the assistant writes
        (text, python calls with their delimiters, <|assistant_end|>), 0 elsewhere.

        Truncation: if the full rendering is longer than max_tokens, it is cut back to the last
        whole-turn boundary that fits (after <|bos|>, <|user_end|> or <|assistant_end|>), so the
        result never ends inside a special-token pair; a first turn longer than max_tokens thus
        leaves just [<|bos|>], an example with no mask-1 token (trainers should skip those)."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        ids, mask, boundaries = [self.bos_id], [0], [1]

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        for message in _chat_messages(conversation):
            role, content = message["role"], message["content"]
            if role == "user":
                add([self.special("<|user_start|>")] + self.encode(content) + [self.special("<|user_end|>")], 0)
            else:
                add([self.special("<|assistant_start|>")], 0)
                parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
                for part in parts:
                    if part["type"] == "text":
                        add(self.encode(part["text"]), 1)
                    elif part["type"] == "python":
                        add([self.special("<|python_start|>")] + self.encode(part["text"])
                            + [self.special("<|python_end|>")], 1)
                    else:  # python_output: forced by the tool at inference, so never trained on
                        add([self.special("<|output_start|>")] + self.encode(part["text"])
                            + [self.special("<|output_end|>")], 0)
                add([self.special("<|assistant_end|>")], 1)
            boundaries.append(len(ids))
        if len(ids) > max_tokens:
            cut = max(b for b in boundaries if b <= max_tokens)
            ids, mask = ids[:cut], mask[:cut]
        return ids, mask

    def render_for_completion(self, conversation):
        """Ids to prime the model for the next assistant reply: the conversation without its
        final assistant message (if any), then <|assistant_start|>."""
        messages = list(_chat_messages(conversation))
        if messages[-1]["role"] == "assistant":
            messages.pop()
        ids, _ = self.render_conversation(messages, max_tokens=1 << 62)
        return ids + [self.special("<|assistant_start|>")]

    def visualize(self, ids, mask):
        """The rendered tokens for a terminal, for debugging masks: trained-on (mask 1) tokens in
        green, the rest in red, with a grey | between tokens."""
        colours = {0: "\033[91m", 1: "\033[92m"}
        return "\033[90m|\033[0m".join(f"{colours[m]}{self.decode([i])}\033[0m" for i, m in zip(ids, mask))

    # --- persistence -------------------------------------------------------------------------
    def _state(self):
        """Everything that defines the tokenizer (the file adds a readable form of each merge)."""
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "pattern": self.pattern,
                "special_tokens": SPECIAL_TOKENS, "merges": [list(p) for p in self.merges]}

    def save(self, path):
        """Write one JSON file atomically (temp file, then rename). One merge per line, as
        [a, b, "the merged token"] (bytes shown as UTF-8, \\x.. where not valid); load() reads a, b."""
        state = self._state()
        header = "".join(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},\n"
                         for k, v in state.items() if k != "merges")
        merges = ",\n  ".join(json.dumps([a, b, self._bytes[256 + i].decode("utf-8", "backslashreplace")],
                                         ensure_ascii=False) for i, (a, b) in enumerate(self.merges))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("{\n" + header + ' "merges": [\n  ' + merges + "\n ]\n}\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read tokenizer file {path}: {e}; "
                             "retrain it with `python bpe.py train`") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT_NAME:
            raise ValueError(f"{path} is not a slimchat tokenizer file (no format={FORMAT_NAME!r})")
        if state.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} has tokenizer format version {state.get('version')}, "
                             f"this bpe.py reads version {FORMAT_VERSION}; retrain the tokenizer")
        if state.get("special_tokens") != SPECIAL_TOKENS:
            raise ValueError(f"{path} has special tokens {state.get('special_tokens')}, expected {SPECIAL_TOKENS}")
        merges = state.get("merges")
        if not isinstance(merges, list) or not all(
                isinstance(p, list) and len(p) in (2, 3) and type(p[0]) is int and type(p[1]) is int for p in merges):
            raise ValueError(f"{path}: 'merges' must be a list of [int, int(, str)] entries")
        return cls([p[:2] for p in merges], state.get("pattern", SPLIT_PATTERN))

    def fingerprint(self):
        """Short hash of pattern + merges + specials: two tokenizers agree iff their fingerprints do."""
        blob = json.dumps(self._state(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _chat_messages(conversation):
    """Validate a conversation and yield its messages with any system message merged into the
    first user message (system + "\\n\\n" + user). Raises ValueError on anything malformed."""
    messages = conversation.get("messages") if isinstance(conversation, dict) else conversation
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a conversation needs a non-empty list of messages "
                         "(a list, or a dict with key 'messages')")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {k} must be a dict with 'role' and 'content', got {m!r:.80}")
    messages = list(messages)
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user" or not isinstance(messages[0]["content"], str):
            raise ValueError("a system message must be a str and be followed by a user message")
        first = dict(messages[1], content=_str_content(messages[0], 0) + "\n\n" + _str_content(messages[1], 1))
        messages = [first] + messages[2:]
    for k, m in enumerate(messages):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(f"message {k} has role {m['role']!r} but roles must alternate user, "
                             f"assistant, ... starting with user (after an optional system message)")
        if expected == "user":
            _str_content(m, k)
        elif not isinstance(m["content"], str):
            _check_parts(m["content"], k)
        yield m


def _str_content(message, k):
    if not isinstance(message["content"], str):
        raise ValueError(f"message {k} ({message['role']}) content must be a str, "
                         f"got {type(message['content']).__name__}")
    return message["content"]


def _check_parts(parts, k):
    if not isinstance(parts, list):
        raise ValueError(f"assistant message {k} content must be a str or a list of parts")
    for part in parts:
        if not isinstance(part, dict) or part.get("type") not in ("text", "python", "python_output"):
            raise ValueError(f"assistant message {k}: unknown part {part!r:.80}; a part is "
                             "{'type': 'text'|'python'|'python_output', 'text': str}")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"assistant message {k}: part of type {part['type']!r} needs a str 'text'")

# ---------------------------------------------------------------------------
# worker processes for encode_batch

_worker_tokenizer = None


def _worker_init(merges, pattern):
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(merges, pattern)


def _worker_encode(text):
    return _worker_tokenizer.encode(text)

# ---------------------------------------------------------------------------
# CLI: train on the downloaded shards, report compression

SAMPLES = {
    "prose": ("The river had been low all summer, and by August the old ferry rested on the mud "
              "like a tired animal. Children walked out to it after school, daring one another to "
              "touch the rusted chain, while their parents argued about whether the town should "
              "finally build the bridge it had been promising itself since 1962."),
    "code": ("def merge_intervals(intervals):\n    \"\"\"Merge overlapping [start, end] pairs.\"\"\"\n"
             "    out = []\n    for start, end in sorted(intervals):\n"
             "        if out and start <= out[-1][1]:\n            out[-1][1] = max(out[-1][1], end)\n"
             "        else:\n            out.append([start, end])\n    return out\n\n"
             "print(merge_intervals([[1, 3], [2, 6], [8, 10]]))  # [[1, 6], [8, 10]]\n"),
    "math": ("Let $f(x) = 3x^2 - 12x + 7$. Completing the square gives $f(x) = 3(x-2)^2 - 5$, so "
             "the minimum is $-5$ at $x = 2$. Hence $\\int_0^4 f(x)\\,dx = [x^3 - 6x^2 + 7x]_0^4 "
             "= 64 - 96 + 28 = -4$, and $\\sum_{k=1}^{n} k^2 = n(n+1)(2n+1)/6$ for $n \\geq 1$."),
    "russian": ("Вечером в маленьком городе зажглись фонари, и на площади собрались люди, чтобы "
                "послушать уличных музыкантов. Старик продавал жареные каштаны, а дети бегали "
                "вокруг фонтана, пока их родители обсуждали новости прошедшей недели."),
}


def parse_args(argv, defaults):
    """--name=value for the keys of `defaults`; the type comes from the default."""
    args = dict(defaults)
    for arg in argv:
        name, eq, text = arg[2:].partition("=")
        if not (arg.startswith("--") and eq and name in args):
            sys.exit(f"bad argument {arg!r}; expected --name=value with name in: {', '.join(args)} (see --help)")
        try:
            args[name] = type(defaults[name])(text)
        except ValueError:
            kind = type(defaults[name]).__name__
            sys.exit(f"--{name} expects {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {text!r}")
    return args


def shard_paths(data_dir):
    """Training shards in order: every shard_*.parquet except the val shard."""
    if not os.path.isdir(data_dir):
        sys.exit(f"no data directory {data_dir}; download shards first (pretrain.py) or pass --data=DIR")
    names = sorted(n for n in os.listdir(data_dir)
                   if n.startswith("shard_") and n.endswith(".parquet") and n != VAL_SHARD)
    if not names:
        sys.exit(f"no training shards (shard_*.parquet other than {VAL_SHARD}) in {data_dir}")
    return [os.path.join(data_dir, n) for n in names]


def iter_training_text(paths, max_chars, doc_cap=DOC_CAP):
    """Documents (cropped to doc_cap chars) until more than max_chars have been yielded."""
    import pyarrow.parquet as pq
    seen, t0 = 0, time.time()
    for path in paths:
        print(f"reading {os.path.basename(path)} ({seen:,} chars so far, {time.time() - t0:.0f}s)", flush=True)
        for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
            for doc in batch.column(0).to_pylist():
                doc = doc[:doc_cap]
                yield doc
                seen += len(doc)
                if seen > max_chars:
                    return


def train_knobs(home):
    return {"vocab_size": 65536, "max_chars": 2_000_000_000, "data": os.path.join(home, "data"),
            "out": os.path.join(home, "tokenizer", "tokenizer.json")}


def eval_knobs(home):
    return {"data": os.path.join(home, "data"), "path": os.path.join(home, "tokenizer", "tokenizer.json")}


def cli_train(argv, home):
    args = parse_args(argv, train_knobs(home))
    paths = shard_paths(args["data"])
    workers = os.cpu_count() or 1
    print(f"training on {len(paths)} shard(s) in {args['data']}, up to {args['max_chars']:,} chars, "
          f"vocab {args['vocab_size']:,}, {workers} workers", flush=True)
    t0 = time.time()
    tok = Tokenizer.train(iter_training_text(paths, args["max_chars"]), args["vocab_size"], workers, verbose=True)
    print(f"trained in {time.time() - t0:.1f}s; vocab_size {tok.vocab_size:,}; fingerprint {tok.fingerprint()}")
    sample = "Hello world! 123 + 4567 = 4690. It's <|bos|> 你好世界 🌍"
    assert tok.decode(tok.encode(sample)) == sample, "round trip failed after training"
    tok.save(args["out"])
    lengths = tok.token_bytes()[:tok.n_ranks]
    print(f"token bytes: min {lengths.min()} max {lengths.max()} mean {lengths.mean():.4f} "
          f"std {lengths.std():.4f}")
    print(f"wrote {args['out']}")


def cli_eval(argv, home):
    args = parse_args(argv, eval_knobs(home))
    if not os.path.exists(args["path"]):
        sys.exit(f"no tokenizer at {args['path']}; run `python bpe.py train` first")
    tok = Tokenizer.load(args["path"])
    texts = dict(SAMPLES)
    val = os.path.join(args["data"], VAL_SHARD)
    if os.path.exists(val):
        import pyarrow.parquet as pq
        texts["val-shard"] = "\n".join(pq.ParquetFile(val).read_row_group(0, columns=["text"]).column(0).to_pylist())
    else:
        print(f"(no val shard at {val}; reporting the built-in samples only)")
    print(f"tokenizer {args['path']} (vocab {tok.vocab_size:,}, fingerprint {tok.fingerprint()})")
    print(f"{'text':<10} {'bytes':>12} {'tokens':>12} {'bytes/token':>12}")
    for name, text in texts.items():
        ids = tok.encode(text)
        assert tok.decode(ids) == text, f"round trip failed on {name}"
        n_bytes = len(text.encode("utf-8"))
        print(f"{name:<10} {n_bytes:>12,} {len(ids):>12,} {n_bytes / max(1, len(ids)):>12.2f}")


COMMANDS = {  # name: (what it does, its knobs, the function)
    "train": ("train a tokenizer on the downloaded shards and save it", train_knobs, cli_train),
    "eval": ("report the tokenizer's compression (bytes per token) on samples and the val shard", eval_knobs, cli_eval),
}


KNOB_MEANINGS = {"vocab_size": "tokens in the vocabulary, the 9 special tokens included",
                 "max_chars": "read at most this many characters of the shards",
                 "data": "folder of shard_*.parquet files (python pretrain.py --download=N fetches them)",
                 "out": "where to write the tokenizer", "path": "the tokenizer to measure"}


def usage(home, only=None):
    lines = ["bpe.py: slimchat's byte-level BPE tokenizer: train one, or measure its compression.", ""]
    for name, (about, knobs, _) in COMMANDS.items():
        if only in (None, name):
            lines += [f"python bpe.py {name} [--name=value ...]    {about}"]
            lines += [f"  --{k}={v!r}".ljust(44) + f"  # {KNOB_MEANINGS[k]}" for k, v in knobs(home).items()] + [""]
    return "\n".join(lines).rstrip()


if __name__ == "__main__":
    slimchat_home = os.environ.get("SLIMCHAT_HOME") or os.path.expanduser("~/.cache/slimchat")
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in (None, "-h", "--help", "help"):
        print(usage(slimchat_home))
        sys.exit(0 if command else 2)
    if command not in COMMANDS:
        import difflib
        hint = difflib.get_close_matches(command, list(COMMANDS), n=1)
        sys.exit(f"unknown command {command!r}" + (f" (did you mean {hint[0]}?)" if hint else "")
                 + f"; the commands are {', '.join(COMMANDS)} (see python bpe.py --help)")
    if "--help" in sys.argv[2:] or "-h" in sys.argv[2:]:
        print(usage(slimchat_home, command))
        sys.exit(0)
    COMMANDS[command][2](sys.argv[2:], slimchat_home)
