#!/bin/sh
# Site configuration for scripts/check-vagrant-vm.sh's guest, run as a provisioner before
# vagrant/Vagrantfile's own (it is declared in site.Vagrantfile, never in the project's).
# On this kind of machine the guest reaches the package registries only through the check's
# proxy on its default gateway, and the registries' TLS is re-signed by a site CA; an ordinary
# network needs none of this.
#   $1  the proxy's port on the gateway
#   /tmp/bhp-site-ca/*.crt  this machine's extra CA certificates (uploaded just before)
set -eu
port=$1
gw=$(ip -4 route show default | awk '{ print $3; exit }')
[ -n "$gw" ] || { echo "site: the guest has no default route" >&2; exit 1; }
proxy="http://$gw:$port"

# apt (setup.sh's packages, the kernel headers) and pip (setup.sh's virtualenv) through the proxy.
cat >/etc/apt/apt.conf.d/90bhp-site-proxy <<CONF
Acquire::http::Proxy "$proxy";
Acquire::https::Proxy "$proxy";
CONF
certs=$(ls /tmp/bhp-site-ca/*.crt 2>/dev/null || true)
if [ -n "$certs" ]; then
  mkdir -p /usr/local/share/ca-certificates
  for c in $certs; do install -m 0644 "$c" /usr/local/share/ca-certificates/; done
  update-ca-certificates >/dev/null 2>&1    # (its rehash warns about the bundle itself)
  printf '[global]\nproxy = %s\ncert = /etc/ssl/certs/ca-certificates.crt\n' "$proxy" >/etc/pip.conf
else
  printf '[global]\nproxy = %s\n' "$proxy" >/etc/pip.conf
fi
rm -rf /tmp/bhp-site-ca

# sudo looks the host name up; without a resolver it must be in /etc/hosts.
h=$(hostname)
grep -qE "[[:space:]]$h([[:space:]]|\$)" /etc/hosts || printf '127.0.1.1\t%s\n' "$h" >>/etc/hosts
echo "site: apt and pip use $proxy; $(echo "$certs" | grep -c . || true) site CA certificate(s) installed"
