/* bpftrace-hostport: the kernel side.
 *
 * Programs of type BPF_PROG_TYPE_NETFILTER (kernel >= 6.4), attached with the netfilter BPF
 * link inside the node's network namespace, read each packet's conntrack entry and keep
 * per-flow and per-mapping counters here, in maps. User space gets one ring-buffer record per
 * flow (when the flow is first answered); unanswered flows wait in `flows` until user space
 * reports them after its no-answer timeout. Nothing is sent per packet.
 *
 * `flows` holds exactly the flows not yet reported, and deleting a flow's entry is the claim to
 * report it: the kernel deletes it when it reports the flow answered, user space when it
 * reports it after the timeout; whoever's delete succeeds reports, so each flow is reported
 * once. The table stays as small as the flows in flight, which keeps its lookups and inserts
 * in the CPU caches. A reported flow's conntrack entry goes to `known`, where its later
 * packets find their mapping's counters.
 *
 * Every struct offset (sk_buff, nf_conn, nf_conntrack_tuple, bpf_nf_ctx) comes from the
 * running kernel's BTF at load time as -D constants (bpftrace_hostport/ebpf/btf.py,
 * collect/netfilter/probe.py);
 * no kernel struct layout is taken from headers. The constants expected:
 *   NF_CTX_SKB        offsetof(struct bpf_nf_ctx, skb)
 *   SKB_NFCT, SKB_LEN offsetof(struct sk_buff, _nfct / len)
 *   CT_STATUS         offsetof(struct nf_conn, status)
 *   CT_TUPLE_ORIG     offsetof(struct nf_conn, tuplehash[IP_CT_DIR_ORIGINAL].tuple)
 *   CT_TUPLE_REPLY    offsetof(struct nf_conn, tuplehash[IP_CT_DIR_REPLY].tuple)
 *   TUPLE_SIZE        sizeof(struct nf_conntrack_tuple)
 *   TUP_SRC_U3, TUP_SRC_PORT, TUP_L3NUM, TUP_DST_U3, TUP_DST_PORT, TUP_PROTONUM
 *   TP_SKBADDR, TP_REASON   field offsets in the skb:kfree_skb tracepoint record (its format file)
 *   FLOW_TABLE_SIZE, MAP_SIZE, RINGBUF_PAGES   sizes chosen by the user
 *   WAKE_EVERY        records per CPU between wake-ups of the reader (probe.py sizes it)
 */
#include "events.h"

/* Conntrack facts (include/uapi/linux/netfilter/nf_conntrack_common.h): stable UAPI values. */
#define IPS_CONFIRMED   0x08
#define IPS_SRC_NAT     0x10
#define IPS_DST_NAT     0x20
#define IP_CT_ESTABLISHED 0
#define IP_CT_RELATED     1
#define IP_CT_NEW         2
#define IP_CT_ESTABLISHED_REPLY 3
#define IP_CT_RELATED_REPLY     4
#ifndef EEXIST
#define EEXIST          17     /* include/uapi/asm-generic/errno-base.h */
#endif
#define NFCT_PTRMASK    (~7UL) /* skb->_nfct keeps ctinfo in its low 3 bits */
#define NF_AF_INET      2
#define NF_AF_INET6     10

#define PROTO_TCP  6
#define PROTO_UDP  17
#define PROTO_SCTP 132

#ifndef TUPLE_BUF
#define TUPLE_BUF 64
#endif

/* Flows not yet reported (see above). A plain hash, not an LRU: when it is full a new flow is
 * refused and counted (flow_insert_errors), never an unreported one silently evicted. */
BPF_HASH(flows, struct flow_key, struct flow_val, FLOW_TABLE_SIZE);
/* Flows already reported (answered, or timed out), by their conntrack entry (struct nf_conn *):
 * every later packet of such a flow only adds to its mapping's counters, found with one lookup
 * of an 8-byte key instead of reading the tuple and hashing a 40-byte flow key. A recycled
 * entry is recognised by its first packet (IP_CT_NEW, not yet confirmed), which marks it
 * KNOWN_PENDING.
 * User space adds the flows it reports after the timeout. */
BPF_F_TABLE("lru_hash", u64, u32, known, FLOW_TABLE_SIZE, BPF_F_NO_COMMON_LRU);
/* A `known` entry left by an earlier user of a recycled conntrack entry's address, marked by
 * the new entry's first packet: its packets take the slow path until its first reply. */
#define KNOWN_PENDING 0xffffffff
/* Per-mapping counters: a mapping gets a small id once (mapping_ids, free_ids) and its
 * counters live in a per-CPU array slot, so a packet adds to them with one array access (which
 * the verifier inlines) instead of hashing a 24-byte key. `known` keeps the id of each flow. */
BPF_HASH(mapping_ids, struct mapping_key, u32, MAP_SIZE);
BPF_QUEUE(free_ids, u32, MAP_SIZE);      /* filled with 0 .. MAP_SIZE-1 by user space */
BPF_ARRAY(mapping_keys, struct mapping_key, MAP_SIZE);  /* id -> mapping, for drops */
BPF_PERCPU_ARRAY(mappings, struct mapping_val, MAP_SIZE);
BPF_ARRAY(mapping_lat, struct mapping_lat, MAP_SIZE);
BPF_HASH(drops, struct drop_key, u64, MAP_SIZE);
BPF_TABLE("lru_hash", struct miss_key, struct miss_val, misses, MAP_SIZE);
BPF_HASH(watch_ports, struct port_key, u8, 4096);
BPF_HASH(local_addrs, struct addr_key, u8, 1024);
BPF_LPM_TRIE(client_cidrs, struct client_lpm_key, u8, 256);
BPF_ARRAY(config, struct config, 1);
BPF_PERCPU_ARRAY(stats, u64, STAT_MAX);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(since_wakeup, u32, 1);  /* records this CPU submitted since it last woke the reader */

static __always_inline void stat_inc(int idx)
{
    u64 *v = stats.lookup(&idx);
    if (v)
        (*v)++;
}

/* The conntrack entry of an skb the program was handed (a netfilter program's ctx->skb, a
 * trusted pointer the verifier types from BTF): read with plain loads at BTF offsets. */
static __always_inline void *nf_skb_conntrack(void *skb, u8 *ctinfo)
{
    unsigned long nfct = *(unsigned long *)((char *)skb + SKB_NFCT);
    *ctinfo = nfct & 7;
    return (void *)(nfct & NFCT_PTRMASK);
}

/* The same for an skb known only by its address (a tracepoint's record). */
static __always_inline void *skb_conntrack(void *skb, u8 *ctinfo)
{
    unsigned long nfct = 0;
    bpf_probe_read_kernel(&nfct, sizeof(nfct), (char *)skb + SKB_NFCT);
    *ctinfo = nfct & 7;
    return (void *)(nfct & NFCT_PTRMASK);
}

/* Copies one conntrack tuple into a flat buffer; the fields are then picked by BTF offsets. */
static __always_inline int read_tuple(void *ct, int off, u8 *buf)
{
    return bpf_probe_read_kernel(buf, TUPLE_SIZE, (char *)ct + off);
}

static __always_inline u8 tuple_family(u8 *t)
{
    u16 l3num = *(u16 *)(t + TUP_L3NUM);
    if (l3num == NF_AF_INET)
        return 4;
    if (l3num == NF_AF_INET6)
        return 6;
    return 0;
}

static __always_inline void copy_addr(u8 *dst, u8 *src, u8 family)
{
    __builtin_memcpy(dst, src, 16);
    if (family == 4)
        __builtin_memset(dst + 4, 0, 12);
}

/* No memcmp in BPF: compare the address words by hand. */
static __always_inline int addr_equal(u8 *a, u8 *b, u8 family)
{
    if (*(u32 *)a != *(u32 *)b)
        return 0;
    if (family == 4)
        return 1;
    return *(u32 *)(a + 4) == *(u32 *)(b + 4) && *(u32 *)(a + 8) == *(u32 *)(b + 8) &&
           *(u32 *)(a + 12) == *(u32 *)(b + 12);
}

static __always_inline void key_from_orig(struct flow_key *k, u8 *o, u8 family)
{
    k->family = family;
    k->proto = *(o + TUP_PROTONUM);
    k->client_port = *(u16 *)(o + TUP_SRC_PORT);
    k->host_port = *(u16 *)(o + TUP_DST_PORT);
    copy_addr(k->client_addr, o + TUP_SRC_U3, family);
    copy_addr(k->node_addr, o + TUP_DST_U3, family);
}

/* The flow key (the ORIGINAL tuple) of a conntrack entry; its raw tuple stays in `o`.
 * Returns the family (4 or 6), 0 when the entry cannot be read or is of another family. */
static __always_inline u8 flow_key_of(void *ct, u8 *o, struct flow_key *k)
{
    if (read_tuple(ct, CT_TUPLE_ORIG, o))
        return 0;
    u8 family = tuple_family(o);
    if (family)
        key_from_orig(k, o, family);
    return family;
}

static __always_inline void mapping_from(struct mapping_key *m, struct flow_key *k, u8 *r)
{
    m->family = k->family;
    m->proto = k->proto;
    m->host_port = k->host_port;
    m->pod_port = *(u16 *)(r + TUP_SRC_PORT);
    copy_addr(m->pod_addr, r + TUP_SRC_U3, k->family);
}

static __always_inline int proto_allowed(struct config *cfg, u8 proto)
{
    u8 bit = proto == PROTO_TCP ? 1 : proto == PROTO_UDP ? 2 : proto == PROTO_SCTP ? 4 : 0;
    if (!bit)
        return 0;
    return cfg->proto_mask == 0 || (cfg->proto_mask & bit);
}

static __always_inline int is_local(u8 family, u8 *addr)
{
    struct addr_key a = {};
    a.family = family;
    copy_addr(a.addr, addr, family);
    return local_addrs.lookup(&a) != 0;
}

static __always_inline int port_watched(u8 proto, u16 port)
{
    struct port_key p = {};
    p.port = port;
    p.proto = proto;
    return watch_ports.lookup(&p) != 0;
}

static __always_inline int client_allowed(struct config *cfg, struct flow_key *k)
{
    if (!cfg->client_filter)
        return 1;
    struct client_lpm_key lk = {};
    lk.prefixlen = 8 + 128;
    lk.family = k->family;
    __builtin_memcpy(lk.addr, k->client_addr, 16);
    return client_cidrs.lookup(&lk) != 0;
}

/* The id of a mapping, given on its first flow from the queue of free ids (a pop is atomic;
 * this build's compiler has no atomic fetch-and-add). Returns MAP_SIZE when none could be
 * given (every id in use, or the id table full: counted). Two CPUs giving the same new
 * mapping an id at once: one insert wins, the other CPU returns its id to the queue. */
static __always_inline u32 mapping_id(struct mapping_key *m)
{
    u32 *have = mapping_ids.lookup(m);
    if (have)
        return *have;
    u32 id = MAP_SIZE;
    if (free_ids.pop(&id) == 0 && id < MAP_SIZE) {
        mapping_keys.update(&id, m);        /* before the id is published */
        if (mapping_ids.insert(m, &id) == 0)
            return id;
        free_ids.push(&id, 0);
    }
    have = mapping_ids.lookup(m);
    if (have)
        return *have;
    stat_inc(STAT_COUNTER_FULL);
    return MAP_SIZE;
}

static __always_inline void mapping_add(u32 id, u64 flows_inc, u64 bytes)
{
    struct mapping_val *mv = mappings.lookup(&id);
    if (!mv)
        return;                  /* id MAP_SIZE: no counters (counted once, at the flow's start) */
    mv->flows += flows_inc;      /* per-CPU value: no atomics needed */
    mv->packets += 1;
    mv->bytes += bytes;
}

/* A connection to a watched hostPort on a local address that conntrack did not DNAT:
 * a hostNetwork pod (hostPort is a no-op there) or a missing rule. */
static __always_inline void count_miss(struct flow_key *k, u8 hook)
{
    struct miss_key mk = {};
    mk.family = k->family;
    mk.proto = k->proto;
    mk.host_port = k->host_port;
    mk.hook = hook;
    __builtin_memcpy(mk.client_addr, k->client_addr, 16);
    __builtin_memcpy(mk.node_addr, k->node_addr, 16);
    struct miss_val zero = {};
    struct miss_val *mv = misses.lookup_or_try_init(&mk, &zero);
    if (!mv) {
        stat_inc(STAT_COUNTER_FULL);
        return;
    }
    __sync_fetch_and_add(&mv->count, 1);
    mv->last_ns = bpf_ktime_get_ns();
}

/* A packet of a reported flow: added to its mapping's counters (1), or 0 when its conntrack
 * entry is not in `known`. */
static __always_inline int count_known(u64 ctkey, u32 len)
{
    u32 *id = known.lookup(&ctkey);
    if (!id || *id == KNOWN_PENDING)
        return 0;
    mapping_add(*id, 0, len);
    return 1;
}

/* A reported flow's conntrack entry goes to `known`. When the entry's address still has the
 * stale entry its first packet marked KNOWN_PENDING, that one is reused in place (a store)
 * instead of replaced (an insert takes bucket and LRU locks: about 500 ns). */
static __always_inline void remember(u64 ctkey, u32 id)
{
    u32 *slot = known.lookup(&ctkey);
    if (slot)
        *slot = id;
    else
        known.update(&ctkey, &id);
}

/* The latency bucket of a first reply: the first bound (µs) the latency does not exceed. */
static __always_inline u32 latency_bucket(u64 ns)
{
    u64 bounds[LAT_BUCKETS - 1] = {LAT_BOUNDS_US};
#pragma unroll
    for (int i = 0; i < LAT_BUCKETS - 1; i++) {
        if (ns <= bounds[i] * 1000)
            return i;
    }
    return LAT_BUCKETS - 1;
}

/* A flow answered: its mapping's answered count and latency histogram, in the kernel, so that
 * metrics need no per-flow record. Counted once per flow, by whoever holds its claim. */
static __always_inline void count_answered(u32 id, u8 flags, u64 lat)
{
    struct mapping_lat *ml = mapping_lat.lookup(&id);
    if (!ml)
        return;
    __sync_fetch_and_add(&ml->answered, 1);
    if (flags & FLOW_MIDSTREAM)
        return;                  /* began before we attached: no latency */
    __sync_fetch_and_add(&ml->lat_sum_ns, lat);
    u32 b = latency_bucket(lat);
    if (b < LAT_BUCKETS)
        __sync_fetch_and_add(&ml->lat_hist[b], 1);
}

/* Masquerade: a reply tuple whose destination is not the client means the request was
 * source-NATed on its way to the pod (conntrack sets IPS_SRC_NAT once SNAT changed it). */
static __always_inline void note_masquerade(struct flow_val *v, struct flow_key *k, u8 *r, u8 family)
{
    if (!addr_equal(r + TUP_DST_U3, k->client_addr, family) ||
        *(u16 *)(r + TUP_DST_PORT) != k->client_port) {
        v->flags |= FLOW_MASQUERADED;
        copy_addr(v->snat_addr, r + TUP_DST_U3, family);
        v->snat_port = *(u16 *)(r + TUP_DST_PORT);
    }
}

/* Reports an answered flow, at most once: 0 reported, 1 already reported (claimed by user
 * space after the timeout), -1 deferred (reported by user space after --timeout). The flow is
 * copied into a reserved ring-buffer slot first, then its entry deleted: the delete is the
 * claim (the entry's memory may be reused once it is deleted). If the ring buffer cannot give
 * a slot (full, or its lock busy: since 6.15 a reservation can fail under contention), the
 * entry stays and user space reports the flow, answered, after --timeout. Nothing is lost. */
static __always_inline int report_answered(struct flow_key *k, struct flow_val *v)
{
    struct flow_event *e = events.ringbuf_reserve(sizeof(struct flow_event));
    if (!e) {
        stat_inc(STAT_RINGBUF_DEFERRED);
        return -1;
    }
    __builtin_memcpy(&e->key, k, sizeof(*k));
    __builtin_memcpy(&e->val, v, sizeof(*v));
    if (flows.delete(k) != 0) {
        /* already claimed by user space */
        events.ringbuf_discard(e, BPF_RB_NO_WAKEUP);
        return 1;
    }
    /* Batched wake-ups: a wake-up per flow would cost a context switch per flow at high
     * connection rates. The reader sleeps on the ring (at most 250 ms); each CPU wakes it every
     * WAKE_EVERY records, which user space sizes so that all CPUs together wake it well before
     * the ring could fill. */
    u64 wake = BPF_RB_NO_WAKEUP;
    int zero = 0;
    u32 *n = since_wakeup.lookup(&zero);
    if (n && ++*n >= WAKE_EVERY) {
        *n = 0;
        wake = BPF_RB_FORCE_WAKEUP;
    }
    events.ringbuf_submit(e, wake);
    return 0;
}

/* A new flow of this packet in *nv: 1, or -1 when the packet is not one we trace (another
 * protocol, a DNAT to something other than a local address such as a Service ClusterIP, a port
 * not watched, a client filtered out) or its reply tuple cannot be read. */
static __always_inline int new_flow(struct config *cfg, void *ct, struct flow_key *k, u8 family,
                                    u8 ctinfo, u32 status, u32 len, u8 hook, struct flow_val *nv)
{
    if (!proto_allowed(cfg, k->proto) || !is_local(family, k->node_addr))
        return -1;   /* e.g. a Service ClusterIP DNAT: not a hostPort */
    if (!cfg->watch_all && !port_watched(k->proto, k->host_port))
        return -1;
    if (!client_allowed(cfg, k))
        return -1;
    u8 r[TUPLE_BUF] = {};
    if (read_tuple(ct, CT_TUPLE_REPLY, r))
        return -1;
    u64 now = bpf_ktime_get_ns();
    nv->ct = (u64)ct;
    nv->first_ns = now;
    nv->last_ns = now;
    nv->packets_orig = 1;
    nv->bytes_orig = len;
    nv->hook = hook;
    if (ctinfo != IP_CT_NEW)
        nv->flags = FLOW_MIDSTREAM;   /* began before we attached: no latency to measure */
    copy_addr(nv->pod_addr, r + TUP_SRC_U3, family);
    nv->pod_port = *(u16 *)(r + TUP_SRC_PORT);
    if (status & IPS_SRC_NAT)         /* midstream: source NAT already happened */
        note_masquerade(nv, k, r, family);
    struct mapping_key m = {};
    mapping_from(&m, k, r);
    nv->mapping_id = mapping_id(&m);
    return 1;
}

static __always_inline void flow_created(struct flow_val *nv, u32 len)
{
    stat_inc(STAT_FLOWS_CREATED);
    mapping_add(nv->mapping_id, 1, len);
}

/* Runs just after DNAT (priority NF_IP_PRI_NAT_DST + 1 = -99): the packet's destination is
 * already the pod and the conntrack entry holds both tuples. */
static __always_inline int on_post_dnat(void *ctx, u8 hook)
{
    void *skb = *(void **)((char *)ctx + NF_CTX_SKB);
    u8 ctinfo = 0;
    void *ct = nf_skb_conntrack(skb, &ctinfo);
    if (!ct)
        return 1;   /* NF_ACCEPT: untracked packets are not ours to judge */

    u64 ctkey = (u64)ct;
    u32 len = *(u32 *)((char *)skb + SKB_LEN);
    if (ctinfo == IP_CT_ESTABLISHED || ctinfo == IP_CT_ESTABLISHED_REPLY) {
        /* The hot path: a packet of a flow already answered and reported. */
        if (count_known(ctkey, len)) {
            return 1;
        }
    }

    u32 status = 0;
    bpf_probe_read_kernel(&status, sizeof(status), (char *)ct + CT_STATUS);
    /* The first packet of a new conntrack entry (not yet confirmed). */
    int fresh = ctinfo == IP_CT_NEW && !(status & IPS_CONFIRMED);
    if (ctinfo == IP_CT_NEW) {
        if (fresh) {
            /* A new entry: whatever used this address before is gone. Its `known` entry, if
             * any, is marked in place (a store, no lock) rather than deleted (the bucket's lock:
             * about 400 ns); the first reply overwrites it. */
            u32 *stale = known.lookup(&ctkey);
            if (stale)
                *stale = KNOWN_PENDING;
        } else {
            /* A retransmitted first packet (or a UDP request before any reply) of a flow
             * user space reported after the timeout: its counters, as on the hot path. */
            if (count_known(ctkey, len))
                return 1;
        }
    }

    int zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!cfg)
        return 1;

    /* ICMP errors about a flow (RELATED, RELATED_REPLY) are neither requests nor answers:
     * a "port unreachable" from the pod must not count as the pod answering. */
    if (ctinfo == IP_CT_RELATED || ctinfo == IP_CT_RELATED_REPLY)
        return 1;
    int reply = ctinfo == IP_CT_ESTABLISHED_REPLY;
    if (!(status & IPS_DST_NAT)) {
        /* Not translated: only the first packet of a new connection can be a miss. */
        if (reply || ctinfo != IP_CT_NEW || cfg->watch_all)
            return 1;
        u8 o[TUPLE_BUF] = {};
        struct flow_key k = {};
        u8 family = flow_key_of(ct, o, &k);
        if (!family)
            return 1;
        if (!proto_allowed(cfg, k.proto) || !port_watched(k.proto, k.host_port))
            return 1;
        if (!is_local(family, k.node_addr) || !client_allowed(cfg, &k))
            return 1;
        count_miss(&k, hook);
        return 1;
    }

    u8 o[TUPLE_BUF] = {};
    struct flow_key k = {};
    u8 family = flow_key_of(ct, o, &k);
    if (!family)
        return 1;

    /* The first packet of a new conntrack entry almost always starts a new flow: it is
     * inserted without a lookup first (BPF_NOEXIST), and only when the tuple is already there
     * (a retry of a flow not yet reported, below) is that flow looked up. */
    struct flow_val nv = {};
    int built = 0;               /* 1: nv is this packet's new flow; -1: not a hostPort flow */
    if (fresh) {
        built = new_flow(cfg, ct, &k, family, ctinfo, status, len, hook, &nv);
        if (built > 0) {
            int rc = flows.insert(&k, &nv);
            if (rc == 0) {
                flow_created(&nv, len);
                return 1;
            }
            if (rc != -EEXIST) {
                stat_inc(STAT_FLOW_INSERT_ERR);
                return 1;
            }
        } else {
            /* Not a hostPort flow (a Service ClusterIP DNAT, a port not watched): a node
             * with much Service traffic pays no flow table lookup for it. */
            return 1;
        }
    }

    struct flow_val *v = flows.lookup(&k);
    if (v && fresh) {
        /* The first packet of a new conntrack entry on the tuple of a flow not yet reported: a
         * retry of the same unanswered attempt (a SYN retransmitted after a drop) is that flow;
         * a flow that was answered but whose report was deferred is reported now, and the new
         * entry starts a new flow. (A reported flow has no entry here any more: a client port
         * reused after TIME_WAIT, or a retry after the timeout, starts a new flow.) */
        if (v->reply_ns) {
            if (report_answered(&k, v) < 0 && flows.delete(&k) == 0)
                stat_inc(STAT_REUSE_LOST);
            v = 0;
        } else {
            stat_inc(STAT_FLOW_RETRIES);
        }
    }
    if (!v) {
        if (reply) {
            /* Only flows we saw start are tracked; a reply with no flow means the flow
             * table evicted it (or it began before we attached). */
            stat_inc(STAT_REPLY_NO_FLOW);
            return 1;
        }
        if (!built)
            built = new_flow(cfg, ct, &k, family, ctinfo, status, len, hook, &nv);
        if (built < 0)
            return 1;
        if (flows.update(&k, &nv)) {
            stat_inc(STAT_FLOW_INSERT_ERR);
            return 1;
        }
        flow_created(&nv, len);
        return 1;
    }

    /* Packets of a flow not yet answered (and the first reply): its mapping is the one
     * recorded at its first packet, so the reply tuple is read only once, at the first reply. */
    u32 mid = v->mapping_id;
    mapping_add(mid, 0, len);

    if (!reply) {
        __sync_fetch_and_add(&v->packets_orig, 1);
        __sync_fetch_and_add(&v->bytes_orig, len);
        if (ctinfo == IP_CT_NEW)
            v->ct = (u64)ct;   /* a retransmitted first packet may carry a fresh entry */
        /* No program runs after SNAT (it would cost every packet of every flow): a flow not
         * yet answered learns of its masquerade from its next packet, which passes here after
         * the first one was source-NATed. An unanswered flow of one packet cannot know. */
        if ((status & IPS_SRC_NAT) && !(v->flags & FLOW_MASQUERADED)) {
            u8 r[TUPLE_BUF] = {};
            if (!read_tuple(ct, CT_TUPLE_REPLY, r))
                note_masquerade(v, &k, r, family);
        }
        return 1;
    }
    __sync_fetch_and_add(&v->packets_reply, 1);
    __sync_fetch_and_add(&v->bytes_reply, len);
    if (v->reply_ns)
        return 1;
    v->reply_ns = bpf_ktime_get_ns();
    v->last_ns = v->reply_ns;
    v->flags |= FLOW_ANSWERED;
    u8 r[TUPLE_BUF] = {};
    if (read_tuple(ct, CT_TUPLE_REPLY, r) == 0)
        note_masquerade(v, &k, r, family);   /* by the first reply both NAT manips are settled */
    /* What the answered count needs, read before the entry may go. */
    u8 flags = v->flags;
    u64 lat = v->reply_ns - v->first_ns;
    if (cfg->no_records) {
        /* Counters only: deleting the entry is the claim, as for a report. */
        if (flows.delete(&k) == 0) {
            count_answered(mid, flags, lat);
            remember(ctkey, mid);
        }
        return 1;
    }
    /* Deferred (-1): the flow stays in `flows` and is reported, answered, after --timeout. On
     * success its later packets take the hot path above. */
    int rc = report_answered(&k, v);
    if (rc != 1)
        count_answered(mid, flags, lat);
    if (rc == 0)
        remember(ctkey, mid);
    return 1;
}

int nf_prerouting_post_dnat(void *ctx)
{
    return on_post_dnat(ctx, HOOK_PREROUTING);
}

int nf_output_post_dnat(void *ctx)
{
    return on_post_dnat(ctx, HOOK_OUTPUT);
}

/* skb:kfree_skb fires for every dropped skb on the machine (tracepoints are global). A drop
 * is charged to one of our flows only when its conntrack entry is the very entry the flow
 * recorded (in `known`, or the flow's `ct`), which also confines it to the traced network
 * namespace. */
int tp_kfree_skb(void *ctx)
{
    u32 reason = *(u32 *)((char *)ctx + TP_REASON);
    if (reason <= 1)
        return 0;   /* SKB_NOT_DROPPED_YET, SKB_CONSUMED */
    void *skb = *(void **)((char *)ctx + TP_SKBADDR);
    u8 ctinfo = 0;
    void *ct = skb_conntrack(skb, &ctinfo);
    if (!ct)
        return 0;
    u32 status = 0;
    bpf_probe_read_kernel(&status, sizeof(status), (char *)ct + CT_STATUS);
    if (!(status & IPS_DST_NAT))
        return 0;
    /* A reported flow: its conntrack entry is in `known`, with its mapping's id. A flow not yet
     * reported: in `flows` (by its tuple), where its own drop count goes too. */
    u64 ctkey = (u64)ct;
    u32 id = MAP_SIZE;
    u32 *kid = known.lookup(&ctkey);
    if (kid && *kid != KNOWN_PENDING) {
        id = *kid;
    } else {
        u8 o[TUPLE_BUF] = {};
        struct flow_key k = {};
        if (!flow_key_of(ct, o, &k))
            return 0;
        struct flow_val *v = flows.lookup(&k);
        if (!v || v->ct != ctkey)
            return 0;
        __sync_fetch_and_add(&v->drops, 1);
        v->drop_reason = reason;
        id = v->mapping_id;
    }
    stat_inc(STAT_DROPS_SEEN);
    struct mapping_key *mk = mapping_keys.lookup(&id);
    if (!mk)
        return 0;                       /* no id (the mapping tables were full): counted then */
    struct drop_key dk = {};
    __builtin_memcpy(&dk.mapping, mk, sizeof(*mk));
    dk.reason = reason;
    u64 *c = drops.lookup(&dk);
    if (c) {
        __sync_fetch_and_add(c, 1);
        return 0;
    }
    u64 one = 1;
    if (drops.insert(&dk, &one)) {      /* another CPU inserted it first, or the map is full */
        c = drops.lookup(&dk);
        if (c)
            __sync_fetch_and_add(c, 1);
        else
            stat_inc(STAT_COUNTER_FULL);
    }
    return 0;
}
