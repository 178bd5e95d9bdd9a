################################################################################
#
# cloudlet-crates
#
################################################################################

# The crates.io crates that the workspace's Cargo.lock pins, for cloudlet and
# host-cloudlet. Those are local packages: Buildroot rsyncs them and never
# runs their download step, so they cannot vendor crates themselves. Here
# every crate is an ordinary download: `make source` fetches it, mirrors
# (BR2_PRIMARY_SITE, BR2_BACKUP_SITE) serve it, cloudlet-crates.hash checks
# it, and the build needs no network. Cargo.lock is the main "source", so a
# lock changed since scripts/vendor-crates last ran fails its hash check.
# scripts/vendor-crates writes cloudlet-crates.hash and the licence line.
CLOUDLET_CRATES_LOCK = $(BR2_EXTERNAL_CLOUDLET_PATH)/../Cargo.lock
CLOUDLET_CRATES_VERSION := $(shell sha256sum $(CLOUDLET_CRATES_LOCK) 2>/dev/null | cut -c1-12)
CLOUDLET_CRATES_SITE = $(BR2_EXTERNAL_CLOUDLET_PATH)/..
CLOUDLET_CRATES_SITE_METHOD = file
CLOUDLET_CRATES_SOURCE = Cargo.lock
# <name>/<name>-<version>.crate of every crates.io package in Cargo.lock.
CLOUDLET_CRATES_FILES := $(shell awk -F'"' '\
	/^\[\[package\]\]/ { n = ""; v = "" } \
	/^name = / { n = $$2 } \
	/^version = / { v = $$2 } \
	/^source = "registry\+https:\/\/github.com\/rust-lang\/crates.io-index"$$/ \
		{ print n "/" n "-" v ".crate" }' $(CLOUDLET_CRATES_LOCK) 2>/dev/null)
CLOUDLET_CRATES_EXTRA_DOWNLOADS = \
	$(addprefix https://static.crates.io/crates/,$(CLOUDLET_CRATES_FILES))
HOST_CLOUDLET_CRATES_EXTRA_DOWNLOADS = $(CLOUDLET_CRATES_EXTRA_DOWNLOADS)

# Every licence the crates declare (written by scripts/vendor-crates):
CLOUDLET_CRATES_LICENSE = (MIT OR Apache-2.0) AND Unicode-3.0, Apache-2.0, Apache-2.0 AND ISC, Apache-2.0 OR ISC OR MIT, Apache-2.0 OR MIT, Apache-2.0 OR MIT OR MPL-2.0, Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT, BSD-3-Clause, CC0-1.0 OR Apache-2.0 OR Apache-2.0 WITH LLVM-exception, CC0-1.0 OR MIT-0 OR Apache-2.0, ISC, MIT, MIT OR Apache-2.0, MIT OR Apache-2.0 OR BSD-1-Clause, MIT OR Apache-2.0 OR LGPL-2.1-or-later, MIT OR BSD-3-Clause, MPL-2.0, Unicode-3.0, Unlicense OR MIT
# Their licence files, as listed (with their hashes) in cloudlet-crates.hash.
CLOUDLET_CRATES_LICENSE_FILES := $(shell sed -n \
	's/^sha256  [0-9a-f]*  \(VENDOR\/.*\)$$/\1/p' \
	$(BR2_EXTERNAL_CLOUDLET_PATH)/package/cloudlet-crates/cloudlet-crates.hash)

CLOUDLET_CRATES_INSTALL_TARGET = NO
CLOUDLET_CRATES_ADD_TOOLCHAIN_DEPENDENCY = NO

# Each crate unpacks into VENDOR/<name>-<version>/, a directory source that
# cloudlet's cargo build uses in place of crates.io. Cargo checks each
# crate's package checksum against Cargo.lock; the files map is empty, as
# the download was checked whole.
define CLOUDLET_CRATES_EXTRACT_CMDS
	mkdir -p $(@D)/VENDOR
	$(Q)for c in $(notdir $(CLOUDLET_CRATES_FILES)); do \
		$(ZCAT) $(CLOUDLET_CRATES_DL_DIR)/$$c | \
			$(TAR) -C $(@D)/VENDOR $(TAR_OPTIONS) - || exit 1; \
		printf '{"files":{},"package":"%s"}\n' \
			"$$(sha256sum $(CLOUDLET_CRATES_DL_DIR)/$$c | cut -d' ' -f1)" \
			> $(@D)/VENDOR/$${c%.crate}/.cargo-checksum.json || exit 1; \
	done
endef
HOST_CLOUDLET_CRATES_EXTRACT_CMDS = $(CLOUDLET_CRATES_EXTRACT_CMDS)

$(eval $(generic-package))
$(eval $(host-generic-package))
