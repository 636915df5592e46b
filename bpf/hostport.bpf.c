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
 * in the CPU caches. A reported flow's conntrack entry goes to `ctcache`, where its later
 * packets find their mapping's counters.
 *
 * Every struct offset (sk_buff, nf_conn, nf_conntrack_tuple, bpf_nf_ctx) comes from the
 * running kernel's BTF at load time as -D constants (bpftrace_hostport/ebpf/btf.py,
 * collect/netfilter/probe.py);
 * no kernel struct layout is taken from headers. The constants expected:
 *   NF_CTX_SKB        offsetof(struct bpf_nf_ctx, skb)
 *   SKB_NFCT, SKB_LEN offsetof(struct sk_buff, _nfct / len)
 *   SKB_HEAD, SKB_NETWORK_HEADER   offsetof(struct sk_buff, head / network_header): where a
 *                     packet's own bytes are read, for the first packet back of a flow
 *   CT_STATUS         offsetof(struct nf_conn, status)
 *   CT_TUPLE_ORIG     offsetof(struct nf_conn, tuplehash[IP_CT_DIR_ORIGINAL].tuple)
 *   CT_TUPLE_REPLY    offsetof(struct nf_conn, tuplehash[IP_CT_DIR_REPLY].tuple)
 *   TUPLE_SIZE        sizeof(struct nf_conntrack_tuple)
 *   TUP_SRC_U3, TUP_SRC_PORT, TUP_L3NUM, TUP_DST_U3, TUP_DST_PORT, TUP_PROTONUM
 *   TP_SKBADDR, TP_REASON   field offsets in the skb:kfree_skb tracepoint record (its format file)
 *   FLOW_TABLE_SIZE, MAP_SIZE, RINGBUF_PAGES   sizes chosen by the user
 *   CT_SET_BITS       log2 of the sets of `ctcache` (four ways each: FLOW_TABLE_SIZE slots)
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
#define PROTO_ICMP 1
#define PROTO_ICMPV6 58
#define TCP_FLAG_RST 0x04      /* byte 13 of the TCP header (RFC 9293) */
#define SCTP_CHUNK_ABORT 6     /* the first chunk's type, byte 12 of the SCTP packet (RFC 9260) */

#ifndef TUPLE_BUF
#define TUPLE_BUF 64
#endif

/* Flows not yet reported (see above). A plain hash, not an LRU: when it is full a new flow is
 * refused and counted (flow_insert_errors), never an unreported one silently evicted. */
BPF_HASH(flows, struct flow_key, struct flow_val, FLOW_TABLE_SIZE);
/* Flows the kernel reported (answered), by their conntrack entry (struct nf_conn *): every
 * later packet of such a flow only adds to its mapping's counters, found with one array access
 * and four compares instead of reading the tuple and hashing a 40-byte flow key.
 *
 * A 4-way set-associative cache in an array, not a hash map: a hash map's insert takes the
 * bucket's lock and its LRU upkeep walks lists (about 300 ns per insert here, a cold bucket
 * lookup about as much); here a slot is one 8-byte word, the entry's address and its mapping's
 * id, written with compare-and-swap, and a set is one 64-byte line. A set keeps the entries used most
 * recently (by a coarse clock, refreshed at most once per tick): an idle connection's slot goes
 * first, as in an LRU, and such a flow's next packet counts as a new, midstream flow.
 * A recycled entry is recognised by its first packet (IP_CT_NEW, not yet confirmed), which
 * marks its slot CT_PENDING. */
#define CT_WAYS     4
#define CT_ID_BITS  14
#define CT_ID_MASK  ((1ULL << CT_ID_BITS) - 1)
/* A slot left by an earlier user of a recycled conntrack entry's address, marked by the new
 * entry's first packet: its packets take the slow path until its first reply. */
#define CT_PENDING  CT_ID_MASK
/* A conntrack entry whose flow the full flow table refused: counted lost once, at its first
 * packet; its later packets (SYN retransmissions) find this mark and are not counted again. */
#define CT_LOST     (CT_ID_MASK - 1)
#if MAP_SIZE >= CT_LOST
#error "MAP_SIZE must stay below 16382: a cache slot keeps a mapping id in 14 bits"
#endif
/* The same line keeps, in three ways of its own, conntrack entries that are not ours, by
 * address: not DNATed (plain forwarding, the node's own traffic), or DNATed but not to a watched
 * hostPort on a local address (a Service ClusterIP, a NodePort). On a real node most packets are
 * these, and they all run the programs: with their entry here an established packet returns
 * after the one line a packet of a reported flow reads too, without reading the entry; a new
 * entry's first packet clears its address from both kinds of ways in that same line. Plain
 * stores: a lost race only makes a packet read its entry again. Ways of their own, so that the
 * traffic that is not ours never evicts a reported flow. (A connection that began before its
 * hostPort was watched stays ignored until it ends.) */
#define CT_IGNORE_WAYS 3
struct ct_set {
    u64 slot[CT_WAYS];       /* (address >> 3) << CT_ID_BITS | mapping id; 0: empty */
    u16 seen[CT_WAYS];       /* the coarse clock (jiffies >> 8) when the slot was last used */
    u64 ign[CT_IGNORE_WAYS]; /* the address of an entry that is not ours; 0: empty */
};
BPF_ARRAY(ctcache, struct ct_set, 1 << CT_SET_BITS);
/* Flows user space reported after the timeout (unanswered, or answered with the record
 * deferred), by conntrack entry, with their ports (a recycled entry's address is not enough):
 * a later packet of one (a late reply, a retransmission) finds its mapping here and moves it
 * into `ctcache`, rather than starting a flow again. */
BPF_TABLE("lru_hash", u64, struct claimed_val, claimed, FLOW_TABLE_SIZE);
/* Per-mapping counters: a mapping gets a small id once (mapping_ids, free_ids) and its
 * counters live in a per-CPU array slot, so a packet adds to them with one array access (which
 * the verifier inlines) instead of hashing a 24-byte key. `ctcache` keeps the id of each flow. */
BPF_HASH(mapping_ids, struct mapping_key, u32, MAP_SIZE);
BPF_QUEUE(free_ids, u32, MAP_SIZE);      /* filled with 0 .. MAP_SIZE-1 by user space */
BPF_ARRAY(mapping_keys, struct mapping_key, MAP_SIZE);  /* id -> mapping, for drops */
BPF_PERCPU_ARRAY(mappings, struct mapping_val, MAP_SIZE);
BPF_ARRAY(mapping_lat, struct mapping_lat, MAP_SIZE);
BPF_HASH(drops, struct drop_key, u64, MAP_SIZE);
BPF_TABLE("lru_hash", struct miss_key, struct miss_val, misses, MAP_SIZE);
/* The watched hostPorts, a bit per port of each protocol (TCP, UDP, SCTP: 1024 words each),
 * set by user space: one array access instead of hashing a key. */
#define WATCH_WORDS 1024
BPF_ARRAY(watch_ports, u64, 3 * WATCH_WORDS);
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

/* What the slow path needs of a conntrack entry (both tuples and the status) in one read when
 * the BTF offsets put them close together (tuplehash[2], then status: every kernel with the
 * netfilter link), else in three. Where each lands in the buffer: */
#if CT_TUPLE_ORIG < CT_TUPLE_REPLY && CT_TUPLE_REPLY + TUPLE_SIZE <= CT_STATUS && \
    CT_STATUS + 4 - CT_TUPLE_ORIG <= 160
#define CT_ONE_READ 1
#define CT_O 0
#define CT_R (CT_TUPLE_REPLY - CT_TUPLE_ORIG)
#define CT_S (CT_STATUS - CT_TUPLE_ORIG)
#else
#define CT_O 0
#define CT_R 64
#define CT_S 128
#endif
#define CT_BUF 160

static __always_inline int read_ct(void *ct, u8 *b)
{
#ifdef CT_ONE_READ
    return bpf_probe_read_kernel(b, CT_S + 4, (char *)ct + CT_TUPLE_ORIG);
#else
    if (bpf_probe_read_kernel(b + CT_O, TUPLE_SIZE, (char *)ct + CT_TUPLE_ORIG) ||
        bpf_probe_read_kernel(b + CT_R, TUPLE_SIZE, (char *)ct + CT_TUPLE_REPLY))
        return -1;
    return bpf_probe_read_kernel(b + CT_S, 4, (char *)ct + CT_STATUS);
#endif
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

/* port: network byte order, as in a tuple */
static __always_inline int port_watched(u8 proto, u16 port)
{
    u32 slot = proto == PROTO_TCP ? 0 : proto == PROTO_UDP ? 1 : proto == PROTO_SCTP ? 2 : 3;
    if (slot > 2)
        return 0;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    u16 p = __builtin_bswap16(port);
#else
    u16 p = port;
#endif
    u32 i = slot * WATCH_WORDS + (p >> 6);
    u64 *w = watch_ports.lookup(&i);
    return w && ((*w >> (p & 63)) & 1);
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

/* A conntrack entry's tag in a cache slot: its address without the 3 low bits (always zero:
 * skb->_nfct keeps ctinfo there) nor the top ones (the same for every kernel address), moved
 * above the mapping id. */
static __always_inline u64 ct_tag(u64 ct)
{
    return (ct >> 3) << CT_ID_BITS;
}

static __always_inline struct ct_set *ct_set_of(u64 ct)
{
    u32 i = (u32)(((ct >> 3) * 0x9E3779B97F4A7C15ULL) >> (64 - CT_SET_BITS));
    return ctcache.lookup(&i);
}

/* The way of set s that holds tag, or -1. */
static __always_inline int ct_way(struct ct_set *s, u64 tag)
{
#pragma unroll
    for (int w = 0; w < CT_WAYS; w++) {
        if ((s->slot[w] & ~CT_ID_MASK) == tag)
            return w;
    }
    return -1;
}

static __always_inline u16 ct_clock(void)
{
    return (u16)(bpf_jiffies64() >> 8);
}

/* The entry is one that is not ours. */
static __always_inline int ign_has(struct ct_set *s, u64 ct)
{
    return s->ign[0] == ct || s->ign[1] == ct || s->ign[2] == ct;
}

static __always_inline void ign_clear(struct ct_set *s, u64 ct)
{
    if (s->ign[0] == ct)
        s->ign[0] = 0;
    if (s->ign[1] == ct)
        s->ign[1] = 0;
    if (s->ign[2] == ct)
        s->ign[2] = 0;
}

/* Remembers an entry that is not ours: in an empty way, else in one its address picks. */
static __always_inline int ct_ignore(u64 ct)
{
    struct ct_set *s = ct_set_of(ct);
    if (!s || ign_has(s, ct))
        return 1;
    if (s->ign[0] == 0)
        s->ign[0] = ct;
    else if (s->ign[1] == 0)
        s->ign[1] = ct;
    else if (s->ign[2] == 0)
        s->ign[2] = ct;
    else {
        u32 w = (u32)(ct >> 6) % CT_IGNORE_WAYS;
        if (w == 0)
            s->ign[0] = ct;
        else if (w == 1)
            s->ign[1] = ct;
        else
            s->ign[2] = ct;
    }
    return 1;                    /* NF_ACCEPT, for the caller to return */
}

/* A packet of a reported flow, in its set s: added to its mapping's counters (1), or 0 when
 * its conntrack entry is not in the cache (or is marked CT_PENDING). */
static __always_inline int count_known_in(struct ct_set *s, u64 ct, u32 len)
{
    int w = ct_way(s, ct_tag(ct));
    if (w < 0)
        return 0;
    w &= CT_WAYS - 1;
    u32 id = s->slot[w] & CT_ID_MASK;
    if (id == CT_PENDING)
        return 0;
    u16 now = ct_clock();
    if (s->seen[w] != now)
        s->seen[w] = now;        /* a store at most once per tick: the line stays clean */
    mapping_add(id, 0, len);     /* CT_LOST (>= MAP_SIZE): no counters, nothing added */
    return 1;
}

/* The first packet of a new conntrack entry: a slot its address still has from an earlier
 * entry is marked CT_PENDING (compare-and-swap: another CPU may be taking the slot), and an
 * ignored way of that address cleared. */
static __always_inline void ct_forget(u64 ct)
{
    struct ct_set *s = ct_set_of(ct);
    if (!s)
        return;
    ign_clear(s, ct);
    u64 tag = ct_tag(ct);
    int w = ct_way(s, tag);
    if (w < 0)
        return;
    w &= CT_WAYS - 1;
    u64 old = s->slot[w];
    if ((old & ~CT_ID_MASK) == tag)
        __sync_val_compare_and_swap(&s->slot[w], old, tag | CT_PENDING);
}

/* The way to give a new entry: an empty one, else the one used longest ago. */
static __always_inline int ct_victim(struct ct_set *s, u16 now)
{
    int best = 0;
    u16 oldest = 0;
#pragma unroll
    for (int w = 0; w < CT_WAYS; w++) {
        if (s->slot[w] == 0)
            return w;
        u16 age = now - s->seen[w];
        if (w == 0 || age > oldest) {
            oldest = age;
            best = w;
        }
    }
    return best;
}

/* A reported flow's conntrack entry goes to the cache: into its own slot when the address still
 * has one (marked CT_PENDING by its first packet), else into the set's emptiest or stalest way.
 * Compare-and-swap, so that two CPUs taking the same way at once cannot mix their words; the
 * loser tries once more, then gives up (its flow's next packet counts as a midstream flow). */
static __always_inline void remember(u64 ct, u32 id)
{
    struct ct_set *s = ct_set_of(ct);
    if (!s)
        return;
    u64 tag = ct_tag(ct);
    u16 now = ct_clock();
#pragma unroll
    for (int tries = 0; tries < 2; tries++) {
        int w = ct_way(s, tag);
        if (w < 0)
            w = ct_victim(s, now);
        w &= CT_WAYS - 1;
        u64 old = s->slot[w];
        if (__sync_val_compare_and_swap(&s->slot[w], old, tag | id) == old) {
            s->seen[w] = now;
            return;
        }
    }
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

/* A flow decided (answered or refused): its mapping's outcome counts and, for an answer, the
 * latency histogram, in the kernel, so that metrics need no per-flow record. Counted once per
 * flow, by whoever holds its claim. */
static __always_inline void count_outcome(u32 id, u8 flags, u8 outcome, u8 refusal, u64 lat)
{
    struct mapping_lat *ml = mapping_lat.lookup(&id);
    if (!ml)
        return;
    if (outcome == OUTCOME_REFUSED) {
        if (refusal < REFUSALS)
            __sync_fetch_and_add(&ml->refused[refusal], 1);
        return;
    }
    __sync_fetch_and_add(&ml->answered, 1);
    if (flags & FLOW_MIDSTREAM)
        return;                  /* began before we attached: no latency */
    __sync_fetch_and_add(&ml->lat_sum_ns, lat);
    u32 b = latency_bucket(lat);
    if (b < LAT_BUCKETS)
        __sync_fetch_and_add(&ml->lat_hist[b], 1);
}

/* The packet's own bytes from its network header on: the IP header and the start of what it
 * carries, in one read (skb->head + skb->network_header, offsets from BTF). Returns the offset of
 * the transport header in buf (its protocol in *l4), or -1: unreadable, or an IPv6 packet whose
 * next header is an extension header (not followed: the packet is then not judged). */
#define PKT_BUF 80

/* buf[i] of a PKT_BUF buffer on the stack, 0 beyond it. The index goes through an empty asm so
 * that clang adds it to the stack pointer: knowing the buffer's alignment, it would OR it in,
 * which the verifier refuses for a pointer. */
static __always_inline u8 byte_at(u8 *buf, u32 i)
{
    asm volatile("" : "+r"(i));
    if (i >= PKT_BUF)
        return 0;
    return buf[i];
}

static __always_inline int read_packet(void *skb, u8 family, u8 *buf, u8 *l4)
{
    unsigned char *head = *(unsigned char **)((char *)skb + SKB_HEAD);
    u16 nh = *(u16 *)((char *)skb + SKB_NETWORK_HEADER);
    if (bpf_probe_read_kernel(buf, PKT_BUF, head + nh))
        return -1;
    if (family == 4) {
        int ihl = (buf[0] & 0xf) * 4;
        if (ihl < 20 || ihl > 60)
            return -1;
        *l4 = byte_at(buf, 9);
        return ihl;
    }
    *l4 = byte_at(buf, 6);
    return 40;
}

/* An ICMP (family 4) or ICMPv6 error's kind; REFUSAL_NONE for a message that does not end the
 * flow (fragmentation needed, packet too big: path MTU discovery; anything not an error). */
static __always_inline u8 icmp_refusal(u8 family, u8 type, u8 code)
{
    if (family == 4) {
        if (type == 3) {
            if (code == 4)
                return REFUSAL_NONE;
            if (code == 3)
                return REFUSAL_PORT_UNREACH;
            if (code == 1 || code == 7)
                return REFUSAL_HOST_UNREACH;
            if (code == 0 || code == 6)
                return REFUSAL_NET_UNREACH;
            if (code == 2)
                return REFUSAL_PROTO_UNREACH;
            if (code == 9 || code == 10 || code == 13)
                return REFUSAL_ADMIN;
            return REFUSAL_UNREACH;
        }
        if (type == 11)
            return REFUSAL_TIME_EXCEEDED;
        if (type == 12)
            return REFUSAL_PARAM_PROBLEM;
        return REFUSAL_NONE;
    }
    if (type == 1) {
        if (code == 4)
            return REFUSAL_PORT_UNREACH;
        if (code == 3)
            return REFUSAL_HOST_UNREACH;
        if (code == 0)
            return REFUSAL_NET_UNREACH;
        if (code == 1 || code == 5 || code == 6)
            return REFUSAL_ADMIN;
        return REFUSAL_UNREACH;
    }
    if (type == 3)
        return REFUSAL_TIME_EXCEEDED;
    if (type == 4)
        return REFUSAL_PARAM_PROBLEM;
    return REFUSAL_NONE;
}

/* The first packet back for a flow that has none yet: an answer (OUTCOME_ANSWERED), a refusal
 * (OUTCOME_REFUSED, its kind and sender in v), or OUTCOME_NONE for a packet that decides
 * nothing. `related`: an error about the flow (conntrack's IP_CT_RELATED_REPLY: an ICMP error,
 * or a TCP reset a REJECT rule made) rather than a packet of the flow itself. Read from the
 * packet only here, once per flow: the flag a reply carries (RST, ABORT) is the one thing its
 * conntrack entry does not already say. `b`: PKT_BUF bytes of scratch (the caller's conntrack
 * buffer, done with by then: the stack has no room for another). */
static __always_inline u8 judge_reply(void *skb, struct flow_val *v, u8 family, u8 proto,
                                      int related, u8 hook, u32 len, u8 *b)
{
    u8 l4 = 0;
    int off = read_packet(skb, family, b, &l4);
    if (off < 0)
        return related ? OUTCOME_NONE : OUTCOME_ANSWERED;   /* unreadable: as before, an answer */
    u8 refusal = REFUSAL_NONE;
    if (l4 == PROTO_TCP && (u32)off + 14 <= len) {
        if (byte_at(b, off + 13) & TCP_FLAG_RST)
            refusal = REFUSAL_RESET;
    } else if (l4 == PROTO_SCTP && !related && (u32)off + 13 <= len) {
        if (byte_at(b, off + 12) == SCTP_CHUNK_ABORT)
            refusal = REFUSAL_ABORT;
    } else if (related && (u32)off + 2 <= len &&
               ((family == 4 && l4 == PROTO_ICMP) || (family == 6 && l4 == PROTO_ICMPV6))) {
        u8 type = byte_at(b, off), code = byte_at(b, off + 1);
        refusal = icmp_refusal(family, type, code);
        if (refusal != REFUSAL_NONE) {
            v->icmp_type = type;
            v->icmp_code = code;
        }
    }
    if (refusal == REFUSAL_NONE)
        return related ? OUTCOME_NONE : OUTCOME_ANSWERED;
    v->refusal = refusal;
    /* Who sent it: the node made it (it leaves through LOCAL_OUT: a REJECT rule's reset, the
     * ICMP a neighbour failure produces), or it arrived from the pod's address (replies keep
     * the pod as their source until POST_ROUTING un-DNATs them), or from elsewhere. */
    if (family == 4)
        *(u32 *)(b + 8) = *(u32 *)(b + 12);   /* the source address at one offset for both */
    if (hook == HOOK_OUTPUT)
        v->refused_by = BY_NODE;
    else if (addr_equal(b + 8, v->pod_addr, family))
        v->refused_by = BY_POD;
    else
        v->refused_by = BY_NETWORK;
    return OUTCOME_REFUSED;
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

/* A reserved ring-buffer record, submitted with batched wake-ups: a wake-up per flow would
 * cost a context switch per flow at high connection rates. User space reads the ring every
 * 250 ms, and a reader sleeping on it is woken by each CPU every WAKE_EVERY records, which
 * user space sizes so that all CPUs together wake it well before the ring could fill. */
static __always_inline void submit_record(struct flow_event *e)
{
    u64 wake = BPF_RB_NO_WAKEUP;
    int zero = 0;
    u32 *n = since_wakeup.lookup(&zero);
    if (n && ++*n >= WAKE_EVERY) {
        *n = 0;
        wake = BPF_RB_FORCE_WAKEUP;
    }
    events.ringbuf_submit(e, wake);
}

/* Reports a flow whose outcome is decided (answered or refused), at most once: 0 reported, 1
 * already reported (claimed by user space after the timeout), -1 deferred (reported by user
 * space after --timeout). The flow is copied into a reserved ring-buffer slot first, then its
 * entry deleted: the delete is the claim (the entry's memory may be reused once it is
 * deleted). If the ring buffer cannot give a slot (full, or its lock busy: since 6.15 a
 * reservation can fail under contention), the entry stays and user space reports the flow,
 * with its outcome, after --timeout. Nothing is lost. */
static __always_inline int report_flow(struct flow_key *k, struct flow_val *v)
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
    submit_record(e);
    return 0;
}

/* Whether a connection's ORIGINAL tuple is one we trace: a watched protocol and port on a local
 * address (not, say, a Service ClusterIP), from a client not filtered out. The port first: most
 * connections a node sees are to ports nobody watches. */
static __always_inline int traced(struct config *cfg, struct flow_key *k)
{
    if (!proto_allowed(cfg, k->proto))
        return 0;
    if (!cfg->watch_all && !port_watched(k->proto, k->host_port))
        return 0;
    return is_local(k->family, k->node_addr) && client_allowed(cfg, k);
}

/* A new flow of this packet in *nv (r: its conntrack entry's REPLY tuple). */
static __always_inline void new_flow(void *ct, struct flow_key *k, u8 *r, u8 ctinfo, u32 status,
                                     u32 len, u8 hook, struct flow_val *nv)
{
    u64 now = bpf_ktime_get_ns();
    nv->ct = (u64)ct;
    nv->first_ns = now;
    nv->last_ns = now;
    nv->packets_orig = 1;
    nv->bytes_orig = len;
    nv->hook = hook;
    if (ctinfo != IP_CT_NEW)
        nv->flags = FLOW_MIDSTREAM;   /* began before we attached: no latency to measure */
    copy_addr(nv->pod_addr, r + TUP_SRC_U3, k->family);
    nv->pod_port = *(u16 *)(r + TUP_SRC_PORT);
    if (status & IPS_SRC_NAT)         /* midstream: source NAT already happened */
        note_masquerade(nv, k, r, k->family);
    struct mapping_key m = {};
    mapping_from(&m, k, r);
    nv->mapping_id = mapping_id(&m);
}

static __always_inline void flow_created(struct flow_val *nv, u32 len)
{
    stat_inc(STAT_FLOWS_CREATED);
    mapping_add(nv->mapping_id, 1, len);
}

/* The flow table is full: the flow is lost, counted once per connection. Its conntrack entry is
 * marked CT_LOST in the cache, so that its later packets (a SYN retransmitted because nobody
 * answered fast enough) are neither counted again nor tried again. */
static __always_inline void flow_refused(u64 ct)
{
    stat_inc(STAT_FLOW_INSERT_ERR);
    remember(ct, CT_LOST);
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
        /* One line of the cache answers for most packets: */
        struct ct_set *cs = ct_set_of(ctkey);
        if (!cs)
            return 1;
        /* the hot path: a packet of a flow already answered and reported; */
        if (count_known_in(cs, ctkey, len)) {
            return 1;
        }
        /* or of a connection that is not ours: done. */
        if (ign_has(cs, ctkey)) {
            return 1;
        }
    }

    /* Everything else needs the entry's tuples and status: one read. */
    u8 cb[CT_BUF];
    if (read_ct(ct, cb))
        return 1;
    u8 *o = cb + CT_O, *r = cb + CT_R;
    u32 status = *(u32 *)(cb + CT_S);
    /* The first packet of a new conntrack entry (not yet confirmed). */
    int fresh = ctinfo == IP_CT_NEW && !(status & IPS_CONFIRMED);
    if (ctinfo == IP_CT_NEW) {
        if (fresh) {
            /* A new entry: whatever used this address before is gone. Its slot in the cache,
             * if any, is marked CT_PENDING; the first reply takes it over. An ignored way of
             * the earlier entry is cleared. */
            ct_forget(ctkey);
        } else {
            /* A retransmitted first packet (or a UDP request before any reply) of a flow
             * already reported: its counters, as on the hot path; of a connection that is not
             * ours (a miss already counted at its first packet): nothing. */
            struct ct_set *cs = ct_set_of(ctkey);
            if (!cs || count_known_in(cs, ctkey, len) || ign_has(cs, ctkey))
                return 1;
        }
    }

    int zero = 0;
    struct config *cfg = config.lookup(&zero);
    if (!cfg)
        return 1;

    /* ICMP errors about a flow are not answers: one from the other side (RELATED_REPLY: a
     * "port unreachable" from the pod, a "host unreachable" the node made) refuses a flow that
     * has nothing back yet (judge_reply); one about the reply direction (RELATED) is ignored. */
    if (ctinfo == IP_CT_RELATED)
        return 1;
    int related = ctinfo == IP_CT_RELATED_REPLY;
    int reply = ctinfo == IP_CT_ESTABLISHED_REPLY || related;
    u8 family = tuple_family(o);
    if (!family)
        return 1;
    struct flow_key k = {};
    if (!(status & IPS_DST_NAT)) {
        /* Not translated (NAT is decided at a connection's first packet, so it never will be):
         * only the first packet of a new connection can be a miss; the rest is ignored. */
        if (reply || ctinfo != IP_CT_NEW || cfg->watch_all)
            return related ? 1 : ct_ignore(ctkey);
        key_from_orig(&k, o, family);
        if (traced(cfg, &k))
            count_miss(&k, hook);
        return ct_ignore(ctkey);
    }
    key_from_orig(&k, o, family);

    /* The first packet of a new conntrack entry almost always starts a new flow: it is
     * inserted without a lookup first (BPF_NOEXIST), and only when the tuple is already there
     * (a retry of a flow not yet reported, below) is that flow looked up. */
    struct flow_val nv = {};
    int built = 0;               /* 1: nv is this packet's new flow */
    if (fresh) {
        if (!traced(cfg, &k))
            return ct_ignore(ctkey);   /* a Service ClusterIP DNAT, a port not watched */
        new_flow(ct, &k, r, ctinfo, status, len, hook, &nv);
        built = 1;
        int rc = flows.insert(&k, &nv);
        if (rc == 0) {
            flow_created(&nv, len);
            return 1;
        }
        if (rc != -EEXIST) {
            flow_refused(ctkey);
            return 1;
        }
    }

    struct flow_val *v = flows.lookup(&k);
    if (!v && related)
        return 1;   /* an error about a flow already reported, or not ours */
    if (v && fresh) {
        /* The first packet of a new conntrack entry on the tuple of a flow not yet reported: a
         * retry of the same unanswered attempt (a SYN retransmitted after a drop) is that flow;
         * a flow that was answered but whose report was deferred is reported now, and the new
         * entry starts a new flow. (A reported flow has no entry here any more: a client port
         * reused after TIME_WAIT, or a retry after the timeout, starts a new flow.) */
        if (v->reply_ns) {
            if (report_flow(&k, v) < 0 && flows.delete(&k) == 0)
                stat_inc(STAT_REUSE_LOST);
            v = 0;
        } else {
            stat_inc(STAT_FLOW_RETRIES);
        }
    }
    if (!v) {
        if (!built && !traced(cfg, &k))
            return related ? 1 : ct_ignore(ctkey);   /* not a hostPort flow (a Service ClusterIP) */
        if (!fresh) {
            /* A flow user space reported after the timeout (this very conntrack entry): its
             * later packets go to its mapping's counters, from the cache from now on. */
            struct claimed_val *c = claimed.lookup(&ctkey);
            if (c && c->client_port == k.client_port && c->host_port == k.host_port) {
                u32 cid = c->mapping_id;
                remember(ctkey, cid);
                mapping_add(cid, 0, len);
                return 1;
            }
        }
        if (reply) {
            /* Only flows we saw start are tracked; a reply with no flow means the flow
             * table evicted it (or it began before we attached). */
            stat_inc(STAT_REPLY_NO_FLOW);
            return 1;
        }
        if (!built)
            new_flow(ct, &k, r, ctinfo, status, len, hook, &nv);
        if (flows.update(&k, &nv)) {
            flow_refused(ctkey);
            return 1;
        }
        flow_created(&nv, len);
        return 1;
    }

    /* Packets of a flow not yet answered (and the first reply): its mapping is the one
     * recorded at its first packet. An error about the flow is not one of its packets. */
    u32 mid = v->mapping_id;
    if (!related)
        mapping_add(mid, 0, len);

    if (!reply) {
        __sync_fetch_and_add(&v->packets_orig, 1);
        __sync_fetch_and_add(&v->bytes_orig, len);
        if (ctinfo == IP_CT_NEW)
            v->ct = (u64)ct;   /* a retransmitted first packet may carry a fresh entry */
        /* No program runs after SNAT (it would cost every packet of every flow): a flow not
         * yet answered learns of its masquerade from its next packet, which passes here after
         * the first one was source-NATed. An unanswered flow of one packet cannot know. */
        if ((status & IPS_SRC_NAT) && !(v->flags & FLOW_MASQUERADED))
            note_masquerade(v, &k, r, family);
        return 1;
    }
    if (!related) {
        __sync_fetch_and_add(&v->packets_reply, 1);
        __sync_fetch_and_add(&v->bytes_reply, len);
    }
    if (v->reply_ns)
        return 1;
    note_masquerade(v, &k, r, family);   /* by the first reply both NAT manips are settled */
    u8 outcome = judge_reply(skb, v, family, k.proto, related, hook, len, cb);   /* r is done */
    if (outcome == OUTCOME_NONE)
        return 1;                        /* (an ICMP "packet too big": the flow goes on) */
    v->reply_ns = bpf_ktime_get_ns();
    v->last_ns = v->reply_ns;
    v->outcome = outcome;
    if (outcome == OUTCOME_ANSWERED)
        v->flags |= FLOW_ANSWERED;
    /* What the outcome counts need, read before the entry may go. */
    u8 flags = v->flags, refusal = v->refusal;
    u64 lat = v->reply_ns - v->first_ns;
    if (cfg->no_records) {
        /* Counters only: deleting the entry is the claim, as for a report. */
        if (flows.delete(&k) == 0) {
            count_outcome(mid, flags, outcome, refusal, lat);
            stat_inc(STAT_KERNEL_CLAIMED);
            remember(ctkey, mid);
        }
        return 1;
    }
    /* Deferred (-1): the flow stays in `flows` and is reported, with its outcome, after
     * --timeout. On success its later packets take the hot path above. */
    int rc = report_flow(&k, v);
    if (rc != 1)
        count_outcome(mid, flags, outcome, refusal, lat);
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
 * recorded (in the cache, `claimed`, or the flow's `ct`), which also confines it to the traced network
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
    /* A flow the kernel reported: its conntrack entry is in the cache, with its mapping's id.
     * A flow not yet reported: in `flows` (by its tuple), where its own drop count goes too. A
     * flow user space reported after the timeout: in `claimed`. */
    u64 ctkey = (u64)ct;
    u32 id = CT_PENDING;
    struct ct_set *s = ct_set_of(ctkey);
    if (s) {
        int w = ct_way(s, ct_tag(ctkey));
        if (w >= 0)
            id = s->slot[w & (CT_WAYS - 1)] & CT_ID_MASK;
    }
    if (id == CT_LOST)
        return 0;                       /* a flow the full table refused: counted lost already */
    if (id == CT_PENDING) {
        u8 o[TUPLE_BUF] = {};
        struct flow_key k = {};
        if (!flow_key_of(ct, o, &k))
            return 0;
        struct flow_val *v = flows.lookup(&k);
        if (v && v->ct == ctkey) {
            __sync_fetch_and_add(&v->drops, 1);
            v->drop_reason = reason;
            id = v->mapping_id;
        } else {
            struct claimed_val *c = claimed.lookup(&ctkey);
            if (!c || c->client_port != k.client_port || c->host_port != k.host_port)
                return 0;
            id = c->mapping_id;
        }
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
