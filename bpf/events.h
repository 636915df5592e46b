/* Records shared by the kernel programs (hostport.bpf.c) and user space.
 *
 * One fact, one place: Python never mirrors these structs by hand. bcc exposes every map's
 * key and value as ctypes classes built from this header as compiled (table.Key / table.Leaf),
 * handed over by the compile child; bpftrace_hostport/collect/netfilter/decode.py builds its
 * numpy dtype from them. The few #define values Python needs (hooks, flags, stat indexes) are
 * checked against this file by tests/unit/collect/test_decode.py.
 *
 * Addresses are 16 bytes for both families (IPv4 in the first 4 bytes, the rest zero), as in
 * the kernel's union nf_inet_addr. Ports are in network byte order, as conntrack keeps them.
 */
#ifndef BPFTRACE_HOSTPORT_EVENTS_H
#define BPFTRACE_HOSTPORT_EVENTS_H

/* Where a flow was first seen: the hook that performed its DNAT. */
#define HOOK_PREROUTING 0   /* traffic arriving at the node */
#define HOOK_OUTPUT     1   /* node-local clients: DNAT happens in LOCAL_OUT */

/* flow_val.flags */
#define FLOW_ANSWERED    1   /* a real answer came back (not a refusal: see flow_val.outcome) */
#define FLOW_MASQUERADED 2
#define FLOW_MIDSTREAM   4   /* first seen mid-connection: it began before the tracer attached */

/* flow_val.outcome: what the first packet back said, decided in the kernel from that packet
 * (the first one in the reply direction, or an ICMP error about the flow). A flow with nothing
 * back by --timeout is "unanswered": user space decides that, when it claims the flow. */
#define OUTCOME_NONE     0   /* nothing back (yet) */
#define OUTCOME_ANSWERED 1   /* TCP SYN-ACK, UDP/SCTP data from the pod */
#define OUTCOME_REFUSED  2   /* TCP RST, SCTP ABORT, or an ICMP/ICMPv6 error for the flow */

/* flow_val.refusal: what refused it (records/outcome.py names them; keep the two equal). */
#define REFUSAL_NONE          0
#define REFUSAL_RESET         1   /* TCP RST in reply to the first packet */
#define REFUSAL_ABORT         2   /* SCTP ABORT */
#define REFUSAL_PORT_UNREACH  3   /* ICMP 3/3, ICMPv6 1/4 */
#define REFUSAL_HOST_UNREACH  4   /* ICMP 3/1 (and 3/7), ICMPv6 1/3: a neighbour failure */
#define REFUSAL_NET_UNREACH   5   /* ICMP 3/0 (and 3/6), ICMPv6 1/0 */
#define REFUSAL_PROTO_UNREACH 6   /* ICMP 3/2 */
#define REFUSAL_ADMIN         7   /* ICMP 3/9, 3/10, 3/13; ICMPv6 1/1, 1/5, 1/6: a firewall said no */
#define REFUSAL_TIME_EXCEEDED 8   /* ICMP 11, ICMPv6 3: a loop, or a TTL too small */
#define REFUSAL_PARAM_PROBLEM 9   /* ICMP 12, ICMPv6 4 */
#define REFUSAL_UNREACH       10  /* another destination-unreachable code */
#define REFUSALS              11

/* flow_val.refused_by: where the refusal came from. */
#define BY_POD     1   /* sent from the pod's address, arriving at the node */
#define BY_NODE    2   /* made on the node itself (a REJECT rule, a neighbour that never answered) */
#define BY_NETWORK 3   /* from another address (a router on the way) */

/* Indexes into the per-CPU `stats` array. */
#define STAT_RINGBUF_DEFERRED 0 /* no ring-buffer slot: the flow is reported after the timeout instead */
#define STAT_FLOWS_CREATED   1  /* new flows inserted into the flow table */
#define STAT_FLOW_INSERT_ERR 2  /* the flow table refused an insert (full: more flows in flight than it holds) */
#define STAT_REPLY_NO_FLOW   3  /* a reply for a flow we did not see start (it began before we attached) */
#define STAT_DROPS_SEEN      4  /* translated packets freed with a drop reason */
#define STAT_COUNTER_FULL    5  /* a mapping/miss/drop counter could not be created (map full) */
#define STAT_REUSE_LOST      6  /* a deferred answered flow whose tuple was reused before its report */
#define STAT_FLOW_RETRIES    7  /* a new conntrack entry on the tuple of a flow not yet answered: a retry (a SYN retransmitted after a drop, a client port reused) */
#define STAT_KERNEL_CLAIMED  8  /* flows the kernel decided itself with no record (counters only: answered or refused) */
#define STAT_MAX             9

struct flow_key {            /* the conntrack ORIGINAL tuple: client -> node:hostPort */
    u8  family;              /* 4 or 6 */
    u8  proto;               /* IPPROTO_TCP / UDP / SCTP */
    u16 client_port;
    u16 host_port;
    u16 _pad;
    u8  client_addr[16];
    u8  node_addr[16];
};

struct flow_val {
    u64 ct;                  /* struct nf_conn * of the flow, to match drops to it */
    u64 first_ns;            /* bpf_ktime_get_ns() of the first packet */
    u64 reply_ns;            /* first packet in the reply direction, 0 = none yet */
    u64 last_ns;             /* last change of state (first packet, first reply); not per packet */
    u64 packets_orig, bytes_orig;
    u64 packets_reply, bytes_reply;
    u64 drops;
    u8  pod_addr[16];        /* the conntrack REPLY tuple's source: where DNAT sent it */
    u8  snat_addr[16];       /* the REPLY tuple's destination when masqueraded */
    u16 pod_port;
    u16 snat_port;
    u32 drop_reason;         /* enum skb_drop_reason of the last drop, 0 = none */
    u8  hook;                /* HOOK_* */
    u8  flags;               /* FLOW_* */
    u8  outcome;             /* OUTCOME_*: reply_ns is when it was decided */
    u8  refusal;             /* REFUSAL_*, with outcome OUTCOME_REFUSED */
    u32 mapping_id;          /* the slot of its mapping's counters (MAP_SIZE: none) */
    u8  refused_by;          /* BY_* */
    u8  icmp_type;           /* the ICMP (family 4) or ICMPv6 (family 6) error's type and code */
    u8  icmp_code;
    u8  _pad[5];
};

struct flow_event {          /* one ring-buffer record per flow, when it is first answered */
    struct flow_key key;
    struct flow_val val;
};

struct claimed_val {         /* a flow user space reported after the timeout, by its nf_conn * */
    u16 client_port;         /* its flow_key's ports: the same entry, not a recycled address */
    u16 host_port;
    u32 mapping_id;
};

struct mapping_key {         /* one hostPort mapping as the kernel applied it */
    u8  family;
    u8  proto;
    u16 host_port;
    u16 pod_port;
    u16 _pad;
    u8  pod_addr[16];
};

/* Latency buckets (first packet to first reply), upper bounds in µs, Prometheus style
 * ("less than or equal"); the last one is +Inf. collect/metrics.py LATENCY_BOUNDS_US is the
 * same list (a test keeps them equal). */
#define LAT_BUCKETS 20
#define LAT_BOUNDS_US 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, \
                      100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000

struct mapping_val {         /* per CPU: added to by every packet */
    u64 flows;
    u64 packets;
    u64 bytes;
};

struct mapping_lat {         /* shared (atomic adds): added to once per flow, at its first reply */
    u64 answered;            /* flows that got a real answer */
    u64 lat_sum_ns;          /* sum of their latencies (not midstream ones) */
    u64 lat_hist[LAT_BUCKETS];
    u64 refused[REFUSALS];   /* flows refused, by REFUSAL_* (index 0 unused) */
};

struct drop_key {
    struct mapping_key mapping;
    u32 reason;
    u32 _pad;
};

struct miss_key {            /* a connection to a watched hostPort that was NOT DNATed */
    u8  family;
    u8  proto;
    u16 host_port;
    u8  hook;
    u8  _pad[3];
    u8  client_addr[16];
    u8  node_addr[16];
};

struct miss_val {
    u64 count;
    u64 last_ns;             /* last change of state (first packet, first reply); not per packet */
};

struct addr_key {
    u8  family;
    u8  _pad[3];
    u8  addr[16];
};

struct client_lpm_key {      /* LPM trie key: prefixlen counts bits of family + addr */
    u32 prefixlen;
    u8  family;
    u8  addr[16];
};

struct config {
    u8  watch_all;           /* 1: every DNAT to a local address; 0: only watched ports */
    u8  client_filter;       /* 1: only clients in the client_cidrs trie */
    u8  proto_mask;          /* bit 0 TCP, bit 1 UDP, bit 2 SCTP; 0 = all */
    u8  no_records;          /* 1: no ring-buffer record per answered flow (counters only) */
    u8  _pad[4];
};

#endif
