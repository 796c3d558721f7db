"""Packaging for CPUShare: one package, three twistd plugins and two console scripts."""

from setuptools import find_packages, setup

setup(
    name="cpushare",
    version="0.1.0",
    description="A global market for CPU time: sellers rent idle cycles to buyers' livecd VMs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=[
        *find_packages(include=["cpushare", "cpushare.*"]),
        "twisted.plugins",
    ],
    package_data={
        "cpushare.server.db": ["schema/*.sql"],
        "cpushare.server.site": ["templates/*.html", "static/*"],
        "twisted": ["plugins/cpushare_plugins.py"],
    },
    install_requires=[
        "Twisted[tls]>=23.10",
        "pyOpenSSL>=25.0",
        "cryptography>=41",
        "service_identity>=23.1",
        "attrs",
        "pycdlib>=1.14",
        "psycopg[binary]>=3.1",
        "paypalrestsdk>=1.13",
        "klein>=24.8",
        "jinja2>=3.1",
        "argon2-cffi>=23.1",
        # Built from source against Debian 12's libtss2 3.2.1 (tools/host-deps.sh).
    ],
    extras_require={
        # Trusted computing: sellers with --tpm and markets that take TPM
        # enrolments (--tpm-ca); it builds against Debian's libtss2-dev.
        "tpm": ["tpm2-pytss>=3.0,<4"],
        "test": ["pytest>=7", "pytest-xdist>=3.5", "hypothesis>=6.100", "import-linter>=2.0",
                 "selenium>=4.11"],
    },
    entry_points={
        "console_scripts": [
            "cpushare = cpushare.client.cli.main:main",
            "cpushare-admin = cpushare.server.admin:main",
        ],
    },
)
