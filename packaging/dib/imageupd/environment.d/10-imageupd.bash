# imageupd element: defaults of its settings (see README.rst).
export IMAGEUPD_MODE=${IMAGEUPD_MODE:-agent}
