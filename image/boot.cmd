# Cloudlet A/B boot script (compiled to boot.scr with mkimage).
#
# The boot state is kept twice on this FAT partition, bootstate0.env and
# bootstate1.env, as U-Boot binary environments with a CRC. The newer copy is
# the valid one whose BOOT_SEQ is the other's plus one. Each boot decrements
# the chosen slot's tries and writes the result over the OLDER copy, so a power
# cut in the middle of fatwrite spoils only a copy that was already stale.
# Numbers are hex, as setexpr reads and writes them. The running system
# (cloudlet_proto::bootstate) follows the same rules.

setenv bs_dev "${devtype} ${devnum}:${distro_bootpart}"
if test -z "${devtype}"; then setenv bs_dev "virtio 0:1"; fi
if test -z "${cloudlet_console}"; then setenv cloudlet_console ttyAMA0; fi

# Defaults when neither copy is valid (a fresh or damaged card).
setenv BOOT_ORDER "A B"
setenv BOOT_A_LEFT 3
setenv BOOT_B_LEFT 0
setenv BOOT_SEQ 0
setenv bs_v0 0
setenv bs_v1 0
setenv bs_s0 0
setenv bs_s1 0
if load ${bs_dev} ${loadaddr} bootstate0.env; then
  if env import -c ${loadaddr} 0x1000; then setenv bs_v0 1; setenv bs_s0 ${BOOT_SEQ}; fi
fi
if load ${bs_dev} ${loadaddr} bootstate1.env; then
  if env import -c ${loadaddr} 0x1000; then setenv bs_v1 1; setenv bs_s1 ${BOOT_SEQ}; fi
fi

# Pick the newer copy; the one we write next is the other.
setenv bs_cur none
if test "${bs_v0}" = 1; then setenv bs_cur 0; fi
if test "${bs_v1}" = 1; then
  if test "${bs_v0}" = 1; then
    setexpr bs_next_seq ${bs_s0} + 1
    if test "${bs_next_seq}" = "${bs_s1}"; then setenv bs_cur 1; fi
  else
    setenv bs_cur 1
  fi
fi
if test "${bs_cur}" = none; then
  echo "cloudlet: no valid boot state; using defaults"
  setenv BOOT_ORDER "A B"; setenv BOOT_A_LEFT 3; setenv BOOT_B_LEFT 0; setenv BOOT_SEQ 0
  setenv bs_write 0
else
  load ${bs_dev} ${loadaddr} bootstate${bs_cur}.env
  env import -c ${loadaddr} 0x1000
  if test "${bs_cur}" = 0; then setenv bs_write 1; else setenv bs_write 0; fi
fi

# The first slot in BOOT_ORDER with tries left; count this try.
setenv bs_slot none
for s in ${BOOT_ORDER}; do
  if test "${bs_slot}" = none; then
    if test "${s}" = A; then
      if test ${BOOT_A_LEFT} -gt 0; then setexpr BOOT_A_LEFT ${BOOT_A_LEFT} - 1; setenv bs_slot A; fi
    fi
    if test "${s}" = B; then
      if test ${BOOT_B_LEFT} -gt 0; then setexpr BOOT_B_LEFT ${BOOT_B_LEFT} - 1; setenv bs_slot B; fi
    fi
  fi
done
if test "${bs_slot}" = none; then
  # Every slot used up its tries: boot the first one anyway rather than
  # nothing; the running system decides what to do about it.
  echo "cloudlet: no slot has tries left; booting the first in BOOT_ORDER"
  for s in ${BOOT_ORDER}; do if test "${bs_slot}" = none; then setenv bs_slot ${s}; fi; done
fi

setexpr BOOT_SEQ ${BOOT_SEQ} + 1
env export -c -s 0x1000 ${loadaddr} BOOT_SEQ BOOT_ORDER BOOT_A_LEFT BOOT_B_LEFT
fatwrite ${bs_dev} ${loadaddr} bootstate${bs_write}.env 0x1000
echo "cloudlet: booting slot ${bs_slot} (A left ${BOOT_A_LEFT}, B left ${BOOT_B_LEFT}, seq ${BOOT_SEQ})"

setenv bootargs "console=${cloudlet_console} quiet panic=5 cloudlet.slot=${bs_slot}"
load ${bs_dev} ${kernel_addr_r} Image-${bs_slot}
load ${bs_dev} ${ramdisk_addr_r} initrd-${bs_slot}
booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}
echo "cloudlet: slot ${bs_slot} did not boot; resetting to try again"
reset
