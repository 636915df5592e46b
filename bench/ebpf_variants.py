"""Variants of bpf/hostport.bpf.c that answer "what would it cost if ...", for
`python -m bench.ebpf_sections --variant NAME` (run time only, alternated with the original).

Each variant is the source rewritten at anchors, like the section markers: an anchor that no
longer matches fails loudly (tests/unit/test_bench.py applies every variant to the source).
None of them is a tracer: they are loaded, attached and loaded with traffic exactly as the
original, and only their run time per connection is read.

  floor    what any program on these hooks pays: read the packet's conntrack pointer and,
           for a new entry's first packet, the entry once (to count connections). Nothing
           else. The difference to the original is everything the tracer does.
  clock    floor plus ten bpf_ktime_get_ns() per run: (clock - floor) / 100 per connection
           is the cost of one clock read here (BPF_ENABLE_STATS adds a pair per run).
  pending  flows not yet answered kept in the conntrack cache itself instead of the `flows`
           hash map: the first packet takes a way of its entry's set (compare-and-swap) and
           writes the flow into a parallel array; the first reply finds it by the same set
           lookup, copies it into the ring and turns the slot into a known one with another
           compare-and-swap. No hash map insert, lookup or delete, no separate stale-slot
           mark. A measurement only: user space cannot claim its unanswered flows, a full set
           evicts a waiting flow, retries on a new entry and drops are not attributed.
  minimal  the least any design that records every flow with its latency must do: the hot
           path as it is; a new entry's first packet takes a cache slot and stores its time
           in the set's own cache line; the first reply copies the entry's tuples into a ring
           record and turns the slot into a known one. No hostPort checks, no flow table,
           no mapping ids or counters, no masquerade, misses, retries or drops: a lower bound.
"""
from __future__ import annotations

from typing import Callable, Dict

ENTRY = "static __always_inline int on_post_dnat(void *ctx, u8 hook)\n{\n"


def _find_once(text: str, anchor: str) -> int:
    """Where anchor is in text; SystemExit unless it is there exactly once."""
    n = text.count(anchor)
    if n != 1:
        raise SystemExit(f"bench.ebpf_variants: anchor found {n} times, expected once "
                         f"(the source changed; update the variant): {anchor.strip()[:70]!r}")
    return text.find(anchor)


def _replace(text: str, anchor: str, new: str) -> str:
    _find_once(text, anchor)
    return text.replace(anchor, new)


FLOOR_BODY = """\
    {
        /* bench variant: the floor. Only the conntrack pointer, and one read of a new entry. */
        void *skb = *(void **)((char *)ctx + NF_CTX_SKB);
        u8 ci = 0;
        void *ct = nf_skb_conntrack(skb, &ci);
        if (ct && ci == IP_CT_NEW) {
            u8 b[CT_BUF];
            if (read_ct(ct, b) == 0 && !(*(u32 *)(b + CT_S) & IPS_CONFIRMED))
                stat_inc(STAT_FLOWS_CREATED);
        }
        return 1;
    }
"""

CLOCK_READS = """\
    {
        /* bench variant: ten clock reads a run, on top of the floor. */
        u64 acc = 0;
#pragma unroll
        for (int i = 0; i < 10; i++)
            acc += bpf_ktime_get_ns();
        if (acc == 1)
            return 0;
    }
"""


def floor(text: str) -> str:
    return _replace(text, ENTRY, ENTRY + FLOOR_BODY)


def clock(text: str) -> str:
    return _replace(text, ENTRY, ENTRY + CLOCK_READS + FLOOR_BODY)


TAKE_WAY = """\
/* bench variants: the way a new entry takes in its set (its own stale one, else an empty or
 * the stalest), as remember() chooses it. */
static __always_inline int ct_take_way(struct ct_set *s, u64 tag, u16 now)
{
    int w = ct_way(s, tag);
    if (w < 0)
        w = ct_victim(s, now);
    return w & (CT_WAYS - 1);
}

"""

PENDING_MAPS = """\
BPF_ARRAY(ctcache, struct ct_set, 1 << CT_SET_BITS);
/* bench variant "pending": a waiting flow's slot holds its mapping id with this bit, and the
 * flow itself sits in `pend` at its set's index * 4 + its way. */
#define CT_FLOWBIT 0x2000ULL
#if MAP_SIZE >= CT_FLOWBIT
#error "the pending variant needs MAP_SIZE below 8192"
#endif
BPF_ARRAY(pend, struct flow_event, CT_WAYS << CT_SET_BITS);
"""

PENDING_PATH = """\
    {
        /* bench variant "pending" (see bench/ebpf_variants.py). */
        u32 si = (u32)(((ctkey >> 3) * 0x9E3779B97F4A7C15ULL) >> (64 - CT_SET_BITS));
        struct ct_set *s = ctcache.lookup(&si);
        if (!s)
            return 1;
        u64 tag = ct_tag(ctkey);
        if (fresh) {
            if (!traced(cfg, &k))
                return 1;
            u16 now16 = ct_clock();
            int w = ct_take_way(s, tag, now16);
            u64 old = s->slot[w];
            u32 pi = si * CT_WAYS + w;
            struct flow_event *e = pend.lookup(&pi);
            if (!e)
                return 1;
            __builtin_memcpy(&e->key, &k, sizeof(k));
            __builtin_memset(&e->val, 0, sizeof(e->val));
            new_flow(ct, &k, r, ctinfo, status, len, hook, &e->val);
            u32 nid = e->val.mapping_id;
            if (__sync_val_compare_and_swap(&s->slot[w], old, tag | CT_FLOWBIT | nid) != old)
                return 1;
            s->seen[w] = now16;
            flow_created(&e->val, len);
            return 1;
        }
        int w = ct_way(s, tag);
        if (w >= 0) {
            w &= CT_WAYS - 1;
            u64 cur = s->slot[w];
            u32 id = cur & CT_ID_MASK;
            if (id != CT_PENDING && (id & CT_FLOWBIT)) {
                id &= ~CT_FLOWBIT;
                u32 pi = si * CT_WAYS + w;
                struct flow_event *e = pend.lookup(&pi);
                if (!e)
                    return 1;
                mapping_add(id, 0, len);
                if (!reply) {
                    e->val.packets_orig++;
                    e->val.bytes_orig += len;
                    return 1;
                }
                e->val.packets_reply = 1;
                e->val.bytes_reply = len;
                e->val.reply_ns = bpf_ktime_get_ns();
                e->val.last_ns = e->val.reply_ns;
                e->val.flags |= FLOW_ANSWERED;
                note_masquerade(&e->val, &k, r, family);
                u64 lat = e->val.reply_ns - e->val.first_ns;
                u8 fl = e->val.flags;
                struct flow_event *re = events.ringbuf_reserve(sizeof(struct flow_event));
                if (!re)
                    return 1;
                __builtin_memcpy(re, e, sizeof(*e));
                if (__sync_val_compare_and_swap(&s->slot[w], cur, tag | id) != cur) {
                    events.ringbuf_discard(re, BPF_RB_NO_WAKEUP);
                    return 1;
                }
                submit_record(re);
                count_outcome(id, fl, OUTCOME_ANSWERED, REFUSAL_NONE, lat);
                return 1;
            }
        }
    }
"""

PENDING_ANCHOR = "    struct flow_val nv = {};\n    int built = 0;"


def pending(text: str) -> str:
    text = _replace(text, "BPF_ARRAY(ctcache, struct ct_set, 1 << CT_SET_BITS);\n", PENDING_MAPS)
    text = _replace(text, "    if (id == CT_PENDING)\n        return 0;\n    u16 now = ct_clock();",
                    "    if (id == CT_PENDING || (id & CT_FLOWBIT))\n        return 0;\n    u16 now = ct_clock();")
    text = _replace(text, "            ct_forget(ctkey);\n", "            ;   /* the new flow takes its slot itself */\n")
    text = _replace(text, ENTRY, TAKE_WAY + ENTRY)
    return _replace(text, PENDING_ANCHOR, PENDING_PATH + PENDING_ANCHOR)


MINIMAL_SET_END = "};\nBPF_ARRAY(ctcache, struct ct_set, 1 << CT_SET_BITS);\n"
MINIMAL_FIRST_US = "    u32 first_us[CT_WAYS];   /* bench variant \"minimal\": a waiting flow's first packet (us) */\n"

MINIMAL_BODY = """\
    /* bench variant "minimal" (see bench/ebpf_variants.py): from here on. */
    if (!(status & IPS_DST_NAT))
        return 1;
    u8 family = tuple_family(o);
    if (!family)
        return 1;
    u32 si = (u32)(((ctkey >> 3) * 0x9E3779B97F4A7C15ULL) >> (64 - CT_SET_BITS));
    struct ct_set *s = ctcache.lookup(&si);
    if (!s)
        return 1;
    u64 tag = ct_tag(ctkey);
    if (ctinfo == IP_CT_NEW && !(status & IPS_CONFIRMED)) {
        u16 now16 = ct_clock();
        int w = ct_take_way(s, tag, now16);
        u64 old = s->slot[w];
        s->first_us[w] = (u32)(bpf_ktime_get_ns() >> 10);
        if (__sync_val_compare_and_swap(&s->slot[w], old, tag | CT_PENDING) == old) {
            s->seen[w] = now16;
            stat_inc(STAT_FLOWS_CREATED);
        }
        return 1;
    }
    if (ctinfo != IP_CT_ESTABLISHED_REPLY)
        return 1;
    int w = ct_way(s, tag);
    if (w < 0)
        return 1;
    w &= CT_WAYS - 1;
    u64 cur = s->slot[w];
    if ((cur & CT_ID_MASK) != CT_PENDING)
        return 1;
    u64 now = bpf_ktime_get_ns();
    struct flow_event *e = events.ringbuf_reserve(sizeof(struct flow_event));
    if (!e)
        return 1;
    __builtin_memset(e, 0, sizeof(*e));
    key_from_orig(&e->key, o, family);
    e->val.ct = ctkey;
    e->val.reply_ns = now;
    e->val.first_ns = (u64)s->first_us[w] << 10;
    e->val.flags = FLOW_ANSWERED;
    copy_addr(e->val.pod_addr, r + TUP_SRC_U3, family);
    e->val.pod_port = *(u16 *)(r + TUP_SRC_PORT);
    if (__sync_val_compare_and_swap(&s->slot[w], cur, tag) != cur) {
        events.ringbuf_discard(e, BPF_RB_NO_WAKEUP);
        return 1;
    }
    events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
    return 1;
}

"""


MINIMAL_FROM = "    /* The first packet of a new conntrack entry (not yet confirmed). */\n"
PROGRAMS = "int nf_prerouting_post_dnat(void *ctx)\n"


def minimal(text: str) -> str:
    """on_post_dnat as it is up to the conntrack entry's read (the hot path included), then
    MINIMAL_BODY instead of the rest; the cache's sets get a first-packet time per way."""
    start, end = _find_once(text, MINIMAL_FROM), _find_once(text, PROGRAMS)
    text = _replace(text[:start] + MINIMAL_BODY + text[end:], ENTRY, TAKE_WAY + ENTRY)
    return _replace(text, MINIMAL_SET_END, MINIMAL_FIRST_US + MINIMAL_SET_END)


VARIANTS: Dict[str, Callable[[str], str]] = {"floor": floor, "clock": clock, "pending": pending,
                                             "minimal": minimal}
