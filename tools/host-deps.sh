#!/usr/bin/env bash
# Checks for the Debian packages CPUShare needs and, when running as root,
# installs the missing ones; otherwise says exactly what to install.
set -euo pipefail

need=()
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v openssl >/dev/null || need+=(openssl)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v chrt >/dev/null || need+=(util-linux)
command -v ip >/dev/null || need+=(iproute2)
# The tests of sellers behind a NAT build one in a network namespace.
command -v iptables >/dev/null || need+=(iptables)
command -v ping >/dev/null || need+=(iputils-ping)
command -v ssh >/dev/null && command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v dpkg-deb >/dev/null || need+=(dpkg)
# The store's tests run on PostgreSQL as well as SQLite (test/postgres.py).
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
# The tests of adding funds open PayPal's approval link in a real browser
# that trusts the market's CA through an NSS database (certutil); the web
# site's tests (test/browser) drive it with Selenium through chromedriver.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
command -v certutil >/dev/null || need+=(libnss3-tools)
# The web port's TLS is checked with testssl.sh (test/integration/test_web_tls.py).
command -v testssl >/dev/null || command -v testssl.sh >/dev/null || need+=(testssl.sh)
# Trusted computing (cpushare/attest): pip builds tpm2-pytss from source
# against Debian's libtss2 (cffi: headers, pkg-config and a C compiler), so
# these come before `pip install`; the tests run a software TPM (swtpm,
# swtpm_setup from swtpm-tools).
pkg-config --exists tss2-esys tss2-mu tss2-tctildr 2>/dev/null || need+=(libtss2-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v gcc >/dev/null && command -v make >/dev/null || need+=(build-essential)
command -v swtpm >/dev/null || need+=(swtpm)
command -v swtpm_setup >/dev/null || need+=(swtpm-tools)

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Debian packages: ${need[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    else
        echo "CPUShare needs these Debian packages: ${need[*]}" >&2
        echo "install them with: sudo apt-get install ${need[*]}" >&2
        exit 1
    fi
fi

# A seller run as root starts its VMs as this unprivileged user of their own.
if [ "$(id -u)" = 0 ] && ! getent passwd cpushare-vm >/dev/null; then
    echo "creating the system user cpushare-vm (sellers run their VMs as it)"
    useradd --system --no-create-home --shell /usr/sbin/nologin cpushare-vm
fi
