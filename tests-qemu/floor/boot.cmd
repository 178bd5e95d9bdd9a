# The floor's boot script: the same U-Boot and kernel as Cloudlet, no A/B logic.
load virtio 0:1 ${kernel_addr_r} Image
load virtio 0:1 ${ramdisk_addr_r} initrd
setenv bootargs "console=ttyAMA0 quiet"
booti ${kernel_addr_r} ${ramdisk_addr_r}:${filesize} ${fdtcontroladdr}
