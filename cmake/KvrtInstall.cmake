# cmake --install: header, both libraries, kvrtConfig.cmake (find_package(kvrt)) and kvrt.pc.
# The shared library and the static one are in separate export sets: kvrtTargets.cmake (kvrt::kvrt,
# no dependencies) and kvrtStaticTargets.cmake (kvrt::kvrt_static, loaded by the `static`
# component together with the packages it links).
include(CMakePackageConfigHelpers)
set(kvrt_cmake_dir ${CMAKE_INSTALL_LIBDIR}/cmake/kvrt)
# kvrt.h is the shared library's PUBLIC_HEADER: installed once, here.
install(TARGETS kvrt EXPORT kvrtTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  PUBLIC_HEADER DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS kvrt_static EXPORT kvrtStaticTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(EXPORT kvrtTargets NAMESPACE kvrt:: DESTINATION ${kvrt_cmake_dir})
install(EXPORT kvrtStaticTargets NAMESPACE kvrt:: DESTINATION ${kvrt_cmake_dir})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/kvrtConfig.cmake.in
  ${PROJECT_BINARY_DIR}/kvrtConfig.cmake INSTALL_DESTINATION ${kvrt_cmake_dir})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/kvrtConfigVersion.cmake
  COMPATIBILITY SameMajorVersion)
install(FILES ${PROJECT_BINARY_DIR}/kvrtConfig.cmake ${PROJECT_BINARY_DIR}/kvrtConfigVersion.cmake
  DESTINATION ${kvrt_cmake_dir})

# kvrt.pc is written at install time, so it names the prefix actually installed to
# (`cmake --install B --prefix P`), not the one configured (CMAKE_INSTALL_PREFIX at configure time).
# DESTDIR stays out of it, as it should for a staged install. A relative --prefix is made absolute
# (pkg-config's callers run anywhere).
foreach(dir LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_${dir}}")
    set(kvrt_pc_${dir} "${CMAKE_INSTALL_${dir}}")
  else()
    set(kvrt_pc_${dir} "\\\${prefix}/${CMAKE_INSTALL_${dir}}")  # `${prefix}` in the .pc file
  endif()
endforeach()
install(CODE "
  get_filename_component(KVRT_PC_PREFIX \"\${CMAKE_INSTALL_PREFIX}\" ABSOLUTE)
  set(KVRT_PC_LIBDIR \"${kvrt_pc_LIBDIR}\")
  set(KVRT_PC_INCLUDEDIR \"${kvrt_pc_INCLUDEDIR}\")
  set(PROJECT_VERSION ${PROJECT_VERSION})
  configure_file(\"${PROJECT_SOURCE_DIR}/cmake/kvrt.pc.in\" \"${PROJECT_BINARY_DIR}/pkgconfig/kvrt.pc\"
    @ONLY)")
install(FILES ${PROJECT_BINARY_DIR}/pkgconfig/kvrt.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
