from bpftrace_hostport.cli import main

main()
